"""Benchmark P13 (``python -m benchmarks data_scale``): data at GSM8k-Aug scale and beyond.

For each record count (default 383,872 and 3,838,720: GSM8k-Aug's size and ten times it), a
GSM8k-Aug file of that many lines (3,000 synthetic problems repeated; the tokenizer a 1,024-piece
SentencePiece trained on them), then, each in a clean process of its own whose resident memory
(with its children's) is sampled as it runs:

- the build, ``python -m data_prep build`` (its worker processes' memory counted in), against a
  plain batch tokenization of the same texts (each line's question and the rest of it, batches of
  4,096, the same fast tokenizer);
- the trainer's start-up, ``python -m pipeline.train`` (``configs/tiny-cpu.yaml``, one rank,
  ``train.max_steps=1``) on those shards, against the same on 2,000 records (after a first run
  on them, not counted: it may build DeepSpeed's JIT-compiled ops, 25-45 s, once per machine).

One line per record count, in a fixed form:

    data_scale records=<n> build=<s>s (<r>x plain=<s>s) build_peak=<GB> train=<s>s (+<s>s) \
        train_peak=<GB> (+<GB>) train_private=+<GB>

``train_private``: the peak less the pages mapped from files (the shards memory-mapped, shared by
every rank of a node and dropped by the kernel when memory is short), against 2,000 records.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = 2_000

TOKENIZE = """
import sys
from data_prep.tokenizer import load_pretrained
tok = load_pretrained(sys.argv[1])
batch = []
def flush():
    tok([q for q, _ in batch]); tok([rest for _, rest in batch], add_special_tokens=False); batch.clear()
for line in open(sys.argv[2], encoding="utf-8"):
    question, _, rest = line.partition("||")
    batch.append((question, rest))
    if len(batch) == 4096:
        flush()
flush()
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks data_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", default="383872,3838720", help="comma-separated record counts")
    parser.add_argument("--work", help="folder for the files it writes (default: a temporary one; "
                                       "3.8M records take about 5 GB)")
    return parser


def measured(args: list[str]) -> tuple[float, float, float]:
    """Run ``python ARGS`` from the repository in a process of its own -> (seconds, the peak of its
    and its children's resident memory summed, sampled every 0.1 s, GB; the same less file-backed
    pages, GB)."""
    import psutil

    env = {**os.environ, "PYTHONPATH": REPO, "DS_ACCELERATOR": "cpu"}
    start, peak, private = time.perf_counter(), 0, 0
    with open(os.devnull, "w") as quiet, tempfile.TemporaryFile("w+") as errors:
        proc = psutil.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=quiet, stderr=errors)
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                infos = [p.memory_info() for p in [proc, *proc.children(recursive=True)]]
                peak = max(peak, sum(i.rss for i in infos))
                private = max(private, sum(i.rss - i.shared for i in infos))
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        if proc.returncode:
            errors.seek(0)
            raise SystemExit(f"{' '.join(args)} failed:\n{errors.read()[-2000:]}")
    return seconds, peak / 2**30, private / 2**30


def lines_file(work: str, problems: list[str], n: int) -> str:
    path = os.path.join(work, f"train_{n}.txt")
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(problems[i % len(problems)] + "\n")
    return path


def trained(work: str, shards: str, name: str) -> tuple[float, float, float]:
    return measured(["-m", "pipeline.train", "--config", "configs/tiny-cpu.yaml", f"data={shards}",
                     f"runs_dir={work}/runs", f"name={name}", "train.max_steps=1", "train.validate=false"])


def main(argv: list[str] | None = None) -> None:
    from data_prep.synth import SynthConfig, generate_splits
    from data_prep.tokenizer import build_tokenizer

    args = build_parser().parse_args(argv)
    print("P13 data at scale: data_prep build against a plain batch tokenization of the same texts, and the "
          f"trainer's start-up against {SMALL:,} records, each its own process (seconds, peak resident GB; goals: "
          "build <= 1.5x and <= 2 GB, trainer <= +5 s and <= +0.5 GB)", flush=True)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        problems = generate_splits({"train": 3000, "valid": 0, "test": 0}, 0, SynthConfig())["train"]
        build_tokenizer([lines_file(work, problems, 3000)], 1024, None, os.path.join(work, "tok"))
        small = os.path.join(work, "shards_small")
        measured(["-m", "data_prep", "build", "--source", f"gsm8k-aug:{lines_file(work, problems, SMALL)}",
                  "--tokenizer", os.path.join(work, "tok"), "--out", small])
        trained(work, small, "warm-up")     # builds DeepSpeed's JIT ops where none are cached: not counted
        base_s, base_gb, base_private = trained(work, small, "small")
        for n in (int(x) for x in args.records.split(",")):
            source, shards = lines_file(work, problems, n), os.path.join(work, f"shards_{n}")
            plain_s, _, _ = measured(["-c", TOKENIZE, os.path.join(work, "tok"), source])
            build_s, build_gb, _ = measured(["-m", "data_prep", "build", "--source", f"gsm8k-aug:{source}",
                                          "--tokenizer", os.path.join(work, "tok"), "--out", shards])
            train_s, train_gb, train_private = trained(work, shards, f"records{n}")
            print(f"data_scale records={n} build={build_s:.1f}s ({build_s / plain_s:.2f}x plain={plain_s:.1f}s) "
                  f"build_peak={build_gb:.2f} train={train_s:.1f}s (+{train_s - base_s:.1f}s) "
                  f"train_peak={train_gb:.2f} (+{train_gb - base_gb:.2f}) "
                  f"train_private=+{train_private - base_private:.2f}", flush=True)
            os.remove(source)
            shutil.rmtree(shards)


if __name__ == "__main__":
    main()
