"""A release, read and accounted for, written as the project's merged model directory.

    out = import_release(ImportOptions("internlm/SIM_COT-LLaMA3-CODI-1B", "codi", "models/simcot-1b",
                                       base="meta-llama/Llama-3.2-1B-Instruct"))

The directory is what ``pipeline.merge`` writes (pipeline/inference/merged.py names its files):
the base with LoRA merged, its tables grown from the reference's V+3 rows to the tokenizer's
length (the rows of our other latent tokens start at the mean row and are never scored), the
tokenizer, CODI's projection, the step decoder, and ``latent_config.json`` holding the method
config that reproduces the reference's evaluation; ``import_report.json`` says where every
tensor of the release went.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from common.cli import UserError
from data_prep.templates import Templates
from data_prep.tokenizer import fingerprint, load_pretrained, special_token_ids
from pipeline.inference.merged import LATENT_CONFIG, PROJECTION, STEP_DECODER, latent_config_of
from pipeline.latent.methods import MethodConfig
from pipeline.releases.files import Release, read_release
from pipeline.releases.mapping import Mapped, check_shapes, map_coconut, map_codi
from pipeline.releases.tokens import REFERENCE_ROWS, release_tokenizer

REPORT = "import_report.json"
# The templates each reference's evaluation lays its questions out with (data_prep build options).
TEMPLATES = {"codi": Templates(question_suffix="", step_separator=" ", answer_prefix="The answer is: ",
                               normalise_question=True),
             "coconut": Templates()}


@dataclass(frozen=True)
class ImportOptions:
    source: str                      # a release directory, weight file or hub id
    fmt: str                         # codi | coconut
    out: str
    base: str | None = None          # the model the release was trained from (its config and tokenizer)
    lora_alpha: float = 32           # the reference's (its LoRA alpha is not saved in the weights)
    num_latent: int = 6              # CODI: latents at evaluation (its inf_latent_iterations)
    c_thought: int = 2               # Coconut: latents per stage
    max_latent_stage: int = 5
    stage: int | None = None         # Coconut: the stage evaluated (default max_latent_stage)


@dataclass
class BaseShape:
    """What the release's base must be: its config and the tensors the reference's model has."""
    config: object
    shapes: dict[str, torch.Size]    # at the reference's V + 3 rows
    conv1d: set[str]                 # GPT-2's Conv1D modules (weights stored in x out)
    tables: tuple[str, str]          # the input-embedding and LM-head keys
    tied: bool

    @property
    def optional(self) -> set[str]:
        """Tensors a release may leave out: a tied LM head (its embedding stands for it)."""
        return {self.tables[1]} if self.tied else set()


def import_release(opts: ImportOptions) -> tuple[str, Mapped]:
    """Read, account for and write ``opts.source`` -> (the directory written, the accounting)."""
    release = read_release(opts.source)
    config = base_config(release, opts.base)
    tok = load_pretrained(release.tokenizer_dir or _need_base(opts.base, "its tokenizer"))
    if config.vocab_size == len(tok) + REFERENCE_ROWS:     # a config saved after the reference's resize
        config.vocab_size = len(tok)
    tok, original = release_tokenizer(tok, opts.fmt, config.vocab_size)
    shape = base_shape(config, original + REFERENCE_ROWS)
    if opts.fmt == "codi":
        mapped = map_codi(release.state, opts.lora_alpha, shape.conv1d)
    else:
        mapped = map_coconut(release.state, shape.tables[0])
    _untie(mapped, shape)
    what = f"the base ({config.model_type}, {original} tokens) plus the reference's {REFERENCE_ROWS} added rows"
    check_shapes(mapped.base, shape.shapes, what, shape.optional)
    if mapped.decoder_in:
        raise UserError("the release's step decoder has another width (pj_in.*): importing a decoder of another "
                        "model is not supported; import without it by removing decoder.* and pj_in.* from the weights")
    decoder_shape = base_shape(config, original) if mapped.decoder else None
    if decoder_shape:
        check_shapes(mapped.decoder, decoder_shape.shapes, f"a step decoder of the base at its {original} tokens",
                     decoder_shape.optional)
    method, stage = method_config(opts, mapped, config.hidden_size)
    write(opts, release, mapped, tok, config, (original, method, stage), shape)
    return opts.out, mapped


def base_config(release: Release, base: str | None):
    """The base's config: ``--base``'s, else the release's own (refused when empty, as SIM-CoT ships it)."""
    from transformers import AutoConfig

    if base:
        return AutoConfig.from_pretrained(base)
    if release.config is None:
        raise UserError(f"{release.directory}: its config.json is empty or missing; give the model the release was "
                        "trained from with --base (e.g. --base meta-llama/Llama-3.2-1B-Instruct)")
    config = dict(release.config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise UserError(f"{release.directory}/config.json has no model_type; give --base")
    return AutoConfig.for_model(model_type, **config)


def base_shape(config, rows: int) -> BaseShape:
    """The tensors of ``config``'s causal LM at ``rows`` rows, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config = copy.deepcopy(config)
    config.vocab_size = rows
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    named = list(model.named_parameters(remove_duplicate=False))
    tables = (next(n for n, p in named if p is model.get_input_embeddings().weight),
              [n for n, p in named if p is model.get_output_embeddings().weight][-1])
    return BaseShape(config, {k: v.shape for k, v in model.state_dict().items()},
                     {n for n, m in model.named_modules() if isinstance(m, Conv1D)}, tables,
                     tables[0] != tables[1] and bool(getattr(config, "tie_word_embeddings", False)))


def method_config(opts: ImportOptions, mapped: Mapped, hidden: int) -> tuple[MethodConfig, int]:
    """The method config that reproduces the reference's evaluation, and the stage evaluated."""
    if opts.fmt == "codi":
        inner = mapped.projection["0.weight"].shape[0] if mapped.projection else 0
        return MethodConfig(name="codi", simcot=bool(mapped.decoder), num_latent=opts.num_latent,
                            projection=bool(mapped.projection), prj_dim=0 if inner == hidden else inner,
                            prj_layernorm="3.weight" in mapped.projection, reference_quirks=True), 0
    stage = opts.max_latent_stage if opts.stage is None else opts.stage
    return MethodConfig(name="coconut", simcot=bool(mapped.decoder), c_thought=opts.c_thought,
                        max_latent_stage=opts.max_latent_stage, pad_latent_to_max=True), stage


def write(opts: ImportOptions, release: Release, mapped: Mapped, tok, config, facts: tuple, shape: BaseShape) -> None:
    original, method, stage = facts
    tmp = f"{opts.out}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tok.save_pretrained(tmp)
    tok = load_pretrained(tmp)          # the fingerprint data_prep will compute from the saved files
    _save_lm(config, grown(mapped.base, shape, len(tok)), len(tok), tmp)
    if mapped.decoder:
        _save_lm(config, mapped.decoder, original, os.path.join(tmp, STEP_DECODER))
    if mapped.projection:
        save_file({k: v.contiguous() for k, v in mapped.projection.items()}, os.path.join(tmp, PROJECTION))
    latent = latent_config_of(method, stage, original, special_token_ids(tok), TEMPLATES[opts.fmt].as_dict(),
                              fingerprint(tok), projection=bool(mapped.projection), attention="sdpa",
                              body_forward="auto", source={"release": release.origin, "format": opts.fmt,
                                                           "base": opts.base})
    with open(os.path.join(tmp, LATENT_CONFIG), "w", encoding="utf-8") as handle:
        json.dump(latent, handle, indent=2)
    with open(os.path.join(tmp, REPORT), "w", encoding="utf-8") as handle:
        json.dump({"release": release.origin, **mapped.accounting()}, handle, indent=2)
    shutil.rmtree(opts.out, ignore_errors=True)
    os.replace(tmp, opts.out)


def grown(weights: dict, shape: BaseShape, rows: int) -> dict:
    """The base's tables grown to ``rows``: each new row the mean of the original rows."""
    weights = dict(weights)
    for key in set(shape.tables) & set(weights):
        table = weights[key]
        mean = table[: table.shape[0] - REFERENCE_ROWS].float().mean(dim=0, keepdim=True).to(table.dtype)
        weights[key] = torch.cat([table, mean.expand(rows - table.shape[0], -1)])
    return weights


def _save_lm(config, weights: dict, rows: int, directory: str) -> None:
    config = copy.deepcopy(config)
    config.vocab_size = rows
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})


def _untie(mapped: Mapped, shape: BaseShape) -> None:
    """A tied LM head saved beside its embedding (state dicts hold both names) must be the same tensor."""
    embed, head = shape.tables
    for name, part in (("base", mapped.base), ("step decoder", mapped.decoder)):
        if shape.tied and head in part:
            if embed not in part or not torch.equal(part[head], part[embed]):
                raise UserError(f"release tensor {head} of the {name}: tied to {embed} in this base, but its "
                                "values differ")
            part.pop(head)
            mapped.consumed[name] -= 1
            mapped.dropped.append((f"{name} {head}", f"tied to {embed} (the same tensor, saved under both names)"))


def _need_base(base: str | None, what: str) -> str:
    if not base:
        raise UserError(f"the release ships no tokenizer; give the model it was trained from with --base ({what} "
                        "comes from there)")
    return base
