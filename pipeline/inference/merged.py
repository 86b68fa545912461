"""The merged model directory: its file names, ``latent_config.json``, and loading it back.

    python -m pipeline.merge --run runs/NAME           # writes runs/NAME/merged (pipeline/merge.py)
    merged = load_merged("runs/NAME/merged")
    merged.prompt(record)                               # the question and the latent block it was trained with

Both sides read the names and the config's fields from here: the base model (safetensors) and its
tokenizer, ``latent_config.json`` (the method config, the latent count the checkpoint was trained
with, the special-token ids, the templates, the tokenizer's fingerprint and original vocabulary),
CODI's ``projection.safetensors``, and the SIM-CoT step decoder in ``step_decoder/`` (with
``decoder_in.safetensors`` when it is narrower than the base).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import torch

from common.cli import UserError
from pipeline.latent.attention import pick_attention
from pipeline.latent.methods import MethodConfig, get_method
from pipeline.run_files import LATENT_CONFIG, stamped, upgrade

PROJECTION = "projection.safetensors"
STEP_DECODER = "step_decoder"
DECODER_INPUT = "decoder_in.safetensors"    # the map from the base's width into a narrower step decoder
TRAINED = "trained"                          # load_merged: the attention kernel / decoder stack training used


class NotMerged(UserError):
    """The directory is not a merged model (a user's mistake: exit 2 on the command lines)."""


def latent_config(run, stage: int, shards, projection: bool, source: dict) -> dict:
    """``latent_config.json`` for a checkpoint of ``run`` at curriculum ``stage``."""
    return latent_config_of(run.method, stage, shards.original_vocab_size, shards.special_tokens,
                            shards.manifest["templates"], shards.manifest["tokenizer"]["fingerprint"],
                            projection=projection, attention=run.model.attn_implementation,
                            body_forward=run.model.body_forward, source=source)


def latent_config_of(method: MethodConfig, stage: int, original_vocab_size: int, special: dict, templates: dict,
                     tokenizer_fingerprint: str, *, projection: bool, attention: str, body_forward: str,
                     source: dict) -> dict:
    """``latent_config.json`` of a model of ``method`` at ``stage`` (a merged run's or an imported
    release's): the method config, the stage, its tokenizer's facts, the kernel and stack it runs
    (the latent count and the rest follow from the method config and the stage)."""
    return stamped(LATENT_CONFIG, {
        "method_config": dataclasses.asdict(method), "stage": stage, "original_vocab_size": original_vocab_size,
        "special_tokens": special, "templates": templates, "tokenizer_fingerprint": tokenizer_fingerprint,
        "projection": PROJECTION if projection else None, "attn_implementation": attention,
        "body_forward": body_forward, "source": source})


def read_latent_config(model_dir: str) -> dict:
    """``model_dir``'s ``latent_config.json`` in the current version (an older one upgraded:
    pipeline/run_files.py)."""
    path = os.path.join(model_dir, LATENT_CONFIG)
    if not os.path.isfile(path):
        raise NotMerged(f"--model {model_dir}: not a merged model (no {LATENT_CONFIG}); make one with "
                        "python -m pipeline.merge --run runs/NAME")
    with open(path, encoding="utf-8") as handle:
        return upgrade(LATENT_CONFIG, json.load(handle), path)


def method_config(latent: dict) -> MethodConfig:
    """The method a merged model was trained with."""
    return MethodConfig(**latent["method_config"])


def latents_for(record: dict, latent: dict, cfg: MethodConfig) -> int:
    """The model's latent count, or the problem's own where the model was trained so (Coconut
    without ``pad_latent_to_max``: capped by its steps, as the reference evaluates). A problem
    without steps (an answer-only set) gets the model's count."""
    if cfg.pad_latent_to_max or not record["step_ids"]:
        return cfg.stage_latents(latent["stage"])
    return get_method(cfg.name).prompt_latents(cfg, latent["stage"], len(record["step_ids"]))


def prompt_for(record: dict, latent: dict, cfg: MethodConfig | None = None) -> list[int]:
    """The question, then the latent block the model was trained with: the training layout's own
    ``prompt`` with :func:`latents_for` latents (``cfg``: ``method_config(latent)``, built once by a
    caller that asks for many)."""
    cfg = cfg or method_config(latent)
    return get_method(cfg.name).prompt(cfg, record["question_ids"], latent["special_tokens"],
                                       latents_for(record, latent, cfg))


@dataclass
class MergedModel:
    model: torch.nn.Module                 # the base causal LM
    tokenizer: object
    latent: dict                           # latent_config.json
    cfg: MethodConfig
    projection: torch.nn.Module | None     # CODI's prj
    decoder: torch.nn.Module | None        # the SIM-CoT step decoder
    decoder_in: torch.nn.Module | None     # into a narrower step decoder
    body_forward: str = "auto"             # the decoder stack generation runs (the one training ran)

    @property
    def special(self) -> dict[str, int]:
        return self.latent["special_tokens"]

    def prompt(self, record: dict) -> list[int]:
        return prompt_for(record, self.latent, self.cfg)

    def n_latents(self, record: dict) -> int:
        return latents_for(record, self.latent, self.cfg)

    @property
    def stage_latents(self) -> int:
        """The latent count the model was trained with (a problem with steps enough gets it)."""
        return self.cfg.stage_latents(self.latent["stage"])

    def filled_latent_id(self) -> int | None:
        """The placeholder generation fills pass by pass (None: one pass, e.g. pause)."""
        return self.special["latent"] if get_method(self.cfg.name).fills_latents else None

    def masked_classes(self) -> list[int]:
        """Tokens never generated: the added tokens outside the method's vocabulary (none for a
        model merged before the original vocabulary was recorded)."""
        if "original_vocab_size" not in self.latent:
            return []
        return get_method(self.cfg.name).masked_classes(self.special, self.latent["original_vocab_size"],
                                                        generating=True)


def load_merged(model_dir: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                attention: str = TRAINED, body_forward: str = TRAINED) -> MergedModel:
    """The merged model in ``model_dir`` on ``device``, its LMs calling the attention kernel and its
    generation running the decoder stack training used (``TRAINED``), or those named."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    latent = read_latent_config(model_dir)
    cfg = method_config(latent)
    device = device or torch.device("cpu")
    kernel = _kernel(latent, attention, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=kernel).to(device).eval()
    decoder, decoder_in = load_step_decoder(os.path.join(model_dir, STEP_DECODER), device, dtype, kernel)
    stack = latent.get("body_forward", "auto") if body_forward == TRAINED else body_forward
    projection = load_projection(model_dir, latent.get("projection"), cfg, model.config.hidden_size, device, dtype)
    return MergedModel(model, AutoTokenizer.from_pretrained(model_dir), latent, cfg, projection, decoder, decoder_in,
                       stack)


def _kernel(latent: dict, attention: str, device: torch.device) -> str:
    """The attention kernel to load with: the one training was configured with (absent from a model
    merged before it was recorded: auto), or ``attention``; refused where it cannot run."""
    if attention != TRAINED:
        return pick_attention(attention, device.type == "cuda", setting="--attn-implementation")
    return pick_attention(latent.get("attn_implementation", "auto"), device.type == "cuda",
                          setting=f"{LATENT_CONFIG}'s attn_implementation (the kernel the model was trained with; "
                                  "choose another with --attn-implementation)")


def load_projection(model_dir: str, file: str | None, cfg: MethodConfig, hidden: int, device, dtype):
    """CODI's projection saved as ``file`` (None: the model has none), shaped as ``cfg`` says."""
    if not file:
        return None
    from safetensors.torch import load_file

    from pipeline.latent.reasoner import Projection

    projection = Projection(hidden, cfg.prj_dim or None, layernorm=cfg.prj_layernorm)
    projection.load_state_dict(load_file(os.path.join(model_dir, file)))
    return projection.to(device, dtype).eval()


def load_step_decoder(decoder_dir: str, device: torch.device, dtype: torch.dtype, attention: str = "sdpa"):
    """-> (the step decoder or None, the map from the base's width into it or None)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(decoder_dir):
        return None, None
    decoder = AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=dtype, attn_implementation=attention)
    decoder = decoder.to(device).eval()
    path = os.path.join(decoder_dir, DECODER_INPUT)
    if not os.path.isfile(path):
        return decoder, None
    from safetensors.torch import load_file

    weights = load_file(path)
    decoder_in = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
    decoder_in.load_state_dict(weights)
    return decoder, decoder_in.to(device, dtype).eval()


def fingerprint(model_dir: str) -> str:
    """sha256 over the weights and the latent config."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors") or name == LATENT_CONFIG:
            with open(os.path.join(model_dir, name), "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()
