"""Stage 3a: merge a run's ZeRO checkpoint into a Hugging Face model directory.

    python -m pipeline.merge --run runs/NAME [--tag T] [--dtype bf16|fp32]

Needs nothing but the run directory (its ``config.yaml``, checkpoints and ``data_card/``: the
tokenizer and the shards' manifest). Writes ``runs/NAME/merged/``: the base model as safetensors
(sharded when large; LoRA merged in), the tokenizer, ``latent_config.json`` (the method config and
the stage, the special-token ids, templates; the directory's names are
pipeline/inference/merged.py's) and, for CODI, ``projection.safetensors``; the
SIM-CoT step decoder goes apart to
``merged/step_decoder/`` (interpretability only; inference never needs it). Consolidation is
DeepSpeed's own ``zero_to_fp32``. Every checkpoint key must land somewhere and every model key
must be filled; the merged model is reloaded with ``from_pretrained`` and its logits are checked
against the consolidated weights before the command reports success.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

from common.cli import DATA_ERROR_EXIT, UserError, run_cli
from pipeline.engine import checkpoint
from pipeline.engine.build_model import apply_lora, build_lm, build_step_decoder
from pipeline.engine.config import load_config
from pipeline.inference.merged import DECODER_INPUT, LATENT_CONFIG, PROJECTION, STEP_DECODER, latent_config
from pipeline.run_files import CONFIG, data_card


class MergeError(RuntimeError):
    pass


def rebuild(run, state: dict, vocab_size: int, decoder_vocab: int):
    """Base LM (LoRA merged), step decoder, the weights of its input map (a step decoder of another
    width: ``model.decoder_path``) and of CODI's projection, from a consolidated state dict."""
    state = dict(state)
    base = build_lm(run.model, vocab_size, "sdpa")
    if run.model.lora.enabled:
        base = apply_lora(base, run.model.lora)
        checkpoint.load_exact(base, checkpoint.take(state, "base."), "base (LoRA)")
        base = base.merge_and_unload()
    else:
        checkpoint.load_exact(base, checkpoint.take(state, "base."), "base")
    decoder = None
    if run.method.simcot:
        decoder = build_step_decoder(run.model.step_decoder(), vocab_size, decoder_vocab, "sdpa")
        checkpoint.load_exact(decoder, checkpoint.take(state, "step_decoder."), "step_decoder", cut_vocab_rows=True)
    decoder_in = checkpoint.take(state, "decoder_in.")
    projection = checkpoint.take(state, "projection.")
    if state:
        raise MergeError(f"checkpoint keys that belong nowhere: {sorted(state)[:5]}")
    return base, decoder, decoder_in, projection


def merge(run_dir: str, tag: str | None = None, dtype: str = "fp32", out: str | None = None) -> str:
    if not os.path.isfile(os.path.join(run_dir, CONFIG)):
        raise UserError(f"--run {run_dir}: not a run directory (no config.yaml); give the runs/NAME that "
                        "python -m pipeline.train wrote")
    run = load_config(os.path.join(run_dir, CONFIG))
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    tag = tag or checkpoint.latest_tag(ckpt_dir)
    if tag is None:
        raise UserError(f"--run {run_dir}: no complete checkpoint in {ckpt_dir} yet; train (or resume) it first")
    if not checkpoint.is_complete(ckpt_dir, tag):
        raise UserError(f"--tag {tag}: no complete checkpoint {ckpt_dir}/{tag} (complete: "
                        f"{', '.join(checkpoint.complete_tags(ckpt_dir)) or 'none'})")
    state = checkpoint.consolidated(ckpt_dir, tag)
    client = checkpoint.client_state(ckpt_dir, tag)
    shards = data_card(run_dir, run)
    base, decoder, decoder_in, projection = rebuild(run, state, len(shards.tokenizer), shards.original_vocab_size)
    out = out or os.path.join(run_dir, "merged")
    tmp = f"{out}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    base.to(torch_dtype).save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    shards.tokenizer.save_pretrained(tmp)
    if decoder is not None:
        decoder.to(torch_dtype).save_pretrained(os.path.join(tmp, STEP_DECODER), safe_serialization=True)
        if decoder_in:
            save_file({k: v.to(torch_dtype).contiguous() for k, v in decoder_in.items()},
                      os.path.join(tmp, STEP_DECODER, DECODER_INPUT))
    if projection:
        save_file({k: v.contiguous() for k, v in projection.items()}, os.path.join(tmp, PROJECTION))
    source = {"run": run_dir, "tag": tag, "global_step": client.get("global_step")}
    with open(os.path.join(tmp, LATENT_CONFIG), "w", encoding="utf-8") as handle:
        json.dump(latent_config(run, client["stage"], shards, bool(projection), source), handle, indent=2)
    check_logits(base.float(), tmp, shards.special_tokens["pad"], tolerance=1e-3 if dtype == "fp32" else 5e-2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


PROBE_LENGTHS = (16, 11, 7, 3)    # the rows check_logits feeds: ragged, so padding is checked too


@torch.no_grad()
def check_logits(reference, merged_dir: str, pad: int, tolerance: float) -> float:
    """The merged directory, reloaded, must give the consolidated weights' logits, to ``tolerance``
    of their largest magnitude -> that relative difference, on rows of ids drawn from the whole
    vocabulary (the run's data is not needed). A key that lands in the wrong place or a LoRA left
    unmerged moves them by far more than 1e-3; multithreaded CPU kernels alone move a deep model's
    by about a tenth of that between two forwards of the same weights."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    draw = torch.Generator().manual_seed(0)
    width = max(PROBE_LENGTHS)
    ids = torch.randint(0, reference.config.vocab_size, (len(PROBE_LENGTHS), width), generator=draw)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in PROBE_LENGTHS])
    ids = ids.masked_fill(mask == 0, pad)
    expected = reference.eval()(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    got = merged(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    diff = ((got - expected).abs().max() / expected.abs().max().clamp(min=1.0)).item()
    if diff > tolerance:
        raise MergeError(f"{merged_dir}: reloaded logits differ by {diff:.2e} of their largest (> {tolerance:.0e})")
    return diff


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (runs/NAME)")
    parser.add_argument("--tag", help="checkpoint tag (default: latest complete)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--out", help="output directory (default RUN/merged)")
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = merge(args.run, args.tag, args.dtype, args.out)
    except (MergeError, checkpoint.CheckpointError) as err:      # corrupted or inconsistent checkpoint files
        print(f"error: {err}", file=sys.stderr)
        return DATA_ERROR_EXIT
    print(f"merged {args.run} -> {out} (logits of the reloaded model checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
