"""Import a released latent-CoT checkpoint (CODI, SIM-CoT, Coconut) as a merged model directory.

    python -m pipeline.import_reference --from internlm/SIM_COT-LLaMA3-CODI-1B --format codi \\
        --base meta-llama/Llama-3.2-1B-Instruct --out models/simcot-codi-1b
    python -m pipeline.import_reference --from ckpts/gsm-coconut/checkpoint_24 --format coconut \\
        --base gpt2 --out models/coconut-gpt2

``--from`` is a local directory, one weight file (Coconut's ``checkpoint_N``) or a hub id
(downloaded where a network is). The output is read by ``pipeline.evaluate --model OUT`` as a
merged run is (``--protocol codi|coconut`` evaluates as that paper did) and is accepted by
``checkpoint.init_from=OUT`` to continue training. Every tensor of the release is mapped or
listed as dropped with its reason (``OUT/import_report.json``); a release that does not fit the
base plus the reference's added tokens is refused with the tensors and numbers. Evaluation sets
are built with the imported tokenizer and the reference's templates: docs/reproduce.md.
"""
from __future__ import annotations

import argparse
import sys

from common.cli import run_cli
from pipeline.releases.write import ImportOptions, import_release


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.import_reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, metavar="DIR_OR_HUB_ID",
                        help="the release: a directory, a weight file, or a hub id")
    parser.add_argument("--format", required=True, choices=["codi", "coconut"],
                        help="codi: CODI's and SIM-CoT's CODI module; coconut: Coconut's checkpoint_N")
    parser.add_argument("--base", help="the model the release was trained from (hub id or directory): its config "
                                       "and tokenizer; needed when the release ships none (SIM-CoT's are empty)")
    parser.add_argument("--out", required=True, help="the merged model directory to write")
    parser.add_argument("--lora-alpha", type=float, default=32,
                        help="the release's LoRA alpha (not stored in its weights; the references use 32)")
    parser.add_argument("--num-latent", type=int, default=6, help="CODI: latents at evaluation (default 6)")
    parser.add_argument("--c-thought", type=int, default=2, help="Coconut: latents per stage (default 2)")
    parser.add_argument("--max-latent-stage", type=int, default=5, help="Coconut: its max_latent_stage (default 5)")
    parser.add_argument("--stage", type=int, help="Coconut: the stage evaluated (default --max-latent-stage)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    opts = ImportOptions(args.source, args.format, args.out, base=args.base, lora_alpha=args.lora_alpha,
                         num_latent=args.num_latent, c_thought=args.c_thought,
                         max_latent_stage=args.max_latent_stage, stage=args.stage)
    out, mapped = import_release(opts)
    print(mapped.summary())
    print(f"imported {args.source} -> {out} (every tensor accounted for: {out}/import_report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
