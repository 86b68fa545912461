"""The embedded default, end to end on this CPU: ``make demo`` or ``python -m pipeline.demo --out runs/demo``.

Runs every stage that exists, in data-flow order, and says what each produced:
synthetic GSM-style problems -> SentencePiece tokenizer -> verified shards.
(Training, merge and evaluation join here as those stages land; see DESIGN.md.)
"""
from __future__ import annotations

import argparse
import os
import time

from data_prep.build import BuildOptions, run_build
from data_prep.summary import inspect_shards, verify_shards
from data_prep.synth import SynthConfig, generate_splits, write_splits
from data_prep.tokenizer import build_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="demo directory (default runs/demo)")
    parser.add_argument("--train", type=int, default=20000, help="synthetic training problems")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    data = os.path.join(args.out, "data")

    print(f"[1/3] synthetic problems -> {data}/synth")
    splits = generate_splits({"train": args.train, "valid": 500, "test": 500}, args.seed, SynthConfig())
    paths = write_splits(os.path.join(data, "synth"), splits)
    print(f"[2/3] SentencePiece tokenizer -> {data}/tokenizer")
    tok = build_tokenizer([paths["train"]], 512, None, os.path.join(data, "tokenizer"))
    print(f"      {len(tok)} tokens")
    print(f"[3/3] shards -> {data}/shards")
    shards = os.path.join(data, "shards")
    run_build(BuildOptions([f"gsm8k-aug:{paths[s]}" for s in ("train", "valid", "test")],
                           os.path.join(data, "tokenizer"), shards, shards=2, overwrite=True))
    problems = verify_shards(shards)
    if problems:
        raise SystemExit("shard verification failed: " + "; ".join(problems))
    print("\n" + inspect_shards(shards, examples=1))
    print(f"\ndemo finished in {time.perf_counter() - start:.1f}s: shards verified in {shards}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
