"""Benchmark P7: ``data_prep build`` throughput (``python -m benchmarks build``; ``make bench``).

Builds GSM8K train (7,473 records) three times with a fast tokenizer and reports the median,
with ``--workers`` at its command-line default (this machine's cores),
then builds a GSM8k-Aug-sized file (385,620 lines, the first 3,000 train lines repeated, since the
full file is not available offline) once, to measure rather than project the full-size time.
Needs ``../shared/data`` (or ``--data DIR``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from data_prep.build import BuildOptions, run_build
from data_prep.tokenizer import build_tokenizer

AUG_TRAIN_SIZE = 385_620
WORKERS = len(os.sched_getaffinity(0))      # what `python -m data_prep build` uses by default


def _timed_build(sources: list[str], tokenizer: str, out: str) -> float:
    start = time.perf_counter()
    run_build(BuildOptions(sources, tokenizer, out, shards=4, overwrite=True, workers=WORKERS), log=lambda *_: None)
    return time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--skip-full", action="store_true", help="skip the 385,620-record build")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    gsm8k = os.path.join(args.data, "gsm8k", "train.jsonl")
    aug = os.path.join(args.data, "gsm8k_aug", "train_first3000.txt")
    with tempfile.TemporaryDirectory() as work:
        corpus = os.path.join(work, "corpus.txt")
        with open(gsm8k, encoding="utf-8") as src, open(corpus, "w", encoding="utf-8") as dst:
            dst.writelines(line.replace("\\n", " ") for line in src)
        tok = os.path.join(work, "tok")
        build_tokenizer([corpus], 8000, None, tok)
        times = [_timed_build([f"gsm8k:{gsm8k}"], tok, os.path.join(work, "out")) for _ in range(3)]
        median = statistics.median(times)
        print(f"P7 gsm8k train 7,473 records, {WORKERS} workers: median {median:.2f}s (min {min(times):.2f}, "
              f"max {max(times):.2f}) = {7473 / median:,.0f} records/s (target <= 10 s)")
        if args.skip_full:
            return
        lines = open(aug, encoding="utf-8").read().splitlines()
        big = os.path.join(work, "train.txt")
        with open(big, "w", encoding="utf-8") as handle:
            handle.writelines(lines[i % len(lines)] + "\n" for i in range(AUG_TRAIN_SIZE))
        seconds = _timed_build([f"gsm8k-aug:{big}"], tok, os.path.join(work, "big"))
        print(f"P7 gsm8k-aug-sized train {AUG_TRAIN_SIZE:,} records, {WORKERS} workers: {seconds:.1f}s = "
              f"{AUG_TRAIN_SIZE / seconds:,.0f} records/s (target <= 180 s)")


if __name__ == "__main__":
    main()
