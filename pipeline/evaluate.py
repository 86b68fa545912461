"""Stage 3b: benchmark a merged model on GSM8K-style sets and decode its latents.

    python -m pipeline.evaluate --model runs/NAME/merged --set gsm8k=data/gsm8k-test \\
        --set gsm-hard=data/gsm-hard --split test [--batch-size 64] [--max-new-tokens 64] [--protocol codi]

Each ``--set NAME=DIR`` is a shard directory from ``python -m data_prep build`` (answer-only
evaluation sets included), made with the model's tokenizer and templates (checked). The model
runs on this rank's GPU in bf16 where CUDA is, else on the CPU in fp32 (``--device``, ``--dtype``).
Writes ``eval/report.json``, ``eval/report.md`` and PNG plots next to the model
(``runs/NAME/eval``): accuracy by both published metrics, mean tokens generated
(latents + answer), latency per problem and problems/s, model and data fingerprints, with
``--protocol`` a paper's own rule and limits beside ours, every problem's output in
``predictions.jsonl``, and for a few problems each latent decoded by the step decoder plus its
logit-lens top-5. Run under ``torchrun`` to split the sets across ranks (no problem counted
twice). The work itself lives in ``pipeline/inference/`` (merged, evaluation, decode_latents,
report).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from common.cli import UserError, run_cli
from data_prep import load_shards, read_manifest
from pipeline.inference.decode_latents import decode_latents
from pipeline.inference.evaluation import evaluate_set
from pipeline.inference.generate import generation_passes
from pipeline.inference.merged import TRAINED, fingerprint, load_merged
from pipeline.inference.protocols import PROTOCOLS
from pipeline.inference.report import write_report
from pipeline.latent.attention import kernel_report
from pipeline.latent.lean_forward import BODY_FORWARDS
from pipeline.latent.methods import get_method


def eval_device(requested: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: this rank's GPU in bf16 where CUDA is, else the CPU in fp32 (as training runs)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device here; use --device cpu (or auto)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def check_set_matches_model(latent: dict, shards, path: str) -> None:
    """Shards made with another tokenizer or other templates would be read with the wrong ids."""
    theirs, ours = shards.manifest["tokenizer"]["fingerprint"], latent.get("tokenizer_fingerprint")
    if ours and theirs != ours:
        raise UserError(f"--set {path}: built with tokenizer {theirs[:12]}, but the model was trained with "
                        f"{ours[:12]}; rebuild the set with the model's tokenizer (python -m data_prep build "
                        f"--tokenizer MODEL_DIR ...)")
    if not shards.same_templates(latent["templates"]):
        raise UserError(f"--set {path}: templates {shards.manifest['templates']} differ from the model's "
                        f"{latent['templates']}; rebuild the set with the same --question-suffix/--step-separator/"
                        "--answer-prefix/--normalise-question as the training shards")


def eval_sets(specs: list[str]) -> list[tuple[str, str]]:
    """``--set NAME=DIR`` arguments -> (name, shard dir), checked before the model is loaded."""
    sets = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--set {spec!r}: expected NAME=DIR, e.g. --set gsm8k=data/gsm8k-test")
        read_manifest(path)
        sets.append((name, path))
    return sets


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="merged model directory (python -m pipeline.merge)")
    parser.add_argument("--set", action="append", required=True, metavar="NAME=DIR", help="a shard directory")
    parser.add_argument("--split", default="test", help="split to evaluate (default test; select on valid)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="first N problems per set (0: all)")
    parser.add_argument("--decode-latents", type=int, default=3, help="problems whose latents are decoded")
    parser.add_argument("--out", help="report directory (default: MODEL/../eval)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: this rank's GPU where CUDA is, else the CPU")
    parser.add_argument("--attn-implementation", default=TRAINED, metavar="KERNEL",
                        help="the attention kernel every pass calls: trained (the one the model was trained with), "
                             "sdpa, eager, flash_attention_2, flash_attention_4, or one registered with transformers' "
                             "AttentionInterface")
    parser.add_argument("--body-forward", default=TRAINED, choices=[TRAINED, *BODY_FORWARDS],
                        help="the decoder stack generation runs: trained (the one training ran), or as "
                             "model.body_forward (compiled runs lean here)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="ours",
                        help="a paper's evaluation: its answer rule, new-token limit and batching, reported beside "
                             "ours (pipeline/inference/protocols.py); ours: --max-new-tokens, --batch-size")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on a GPU, fp32 on the CPU (as training runs)")
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if "RANK" in os.environ:
        from pipeline.engine.distributed import init_distributed
        init_distributed()
    sets = eval_sets(args.set)
    merged = load_merged(args.model, *eval_device(args.device, args.dtype), args.attn_implementation,
                         args.body_forward)
    if not dist.is_initialized() or dist.get_rank() == 0:
        kinds = get_method(merged.cfg.name).pass_kinds(merged.cfg)
        passes = generation_passes(merged.model, merged.decoder, merged.body_forward, kinds)
        print(f"attention kernel per pass: {kernel_report(passes)}", flush=True)
    report = {"model": os.path.abspath(args.model), "model_fingerprint": fingerprint(args.model),
              "latent_config": {"method": merged.cfg.name, "simcot": merged.cfg.simcot,
                                "n_latents": merged.stage_latents,
                                **{k: v for k, v in merged.latent.items() if k != "special_tokens"}},
              "split": args.split, "sets": {}, "latents": []}
    for name, path in sets:
        shards = load_shards(path)
        check_set_matches_model(merged.latent, shards, path)
        records = shards.records(args.split)[:args.limit or None]
        result = evaluate_set(merged, records, args.batch_size, args.max_new_tokens, PROTOCOLS[args.protocol])
        result["data_fingerprint"] = shards.manifest["tokenizer"]["fingerprint"]
        result["data"] = {"path": os.path.abspath(path), "shards": [s["sha256"] for s in
                                                                     shards.manifest["splits"][args.split]["shards"]]}
        report["sets"][name] = result
        print(f"{name}: accuracy {100 * result['accuracy_hash']:.1f}% (after '#') / "
              f"{100 * result['accuracy_number']:.1f}% (last number) on {result['n']} problems, "
              f"{result['problems_per_s']:.1f} problems/s"
              + (f"; {args.protocol} protocol {100 * result['protocol']['accuracy']:.1f}%"
                 if result["protocol"]["accuracy"] is not None else ""), flush=True)
        if not report["latents"]:
            report["latents"] = decode_latents(merged, records, args.decode_latents)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.model)), "eval")
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_report(report, out)
        print(f"report: {out}/report.md, {out}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
