"""Benchmark P12 (``python -m benchmarks compile``): the decoder stacks' forward, eager and compiled.

In one process (1 thread, fp32, batch 4, plain PyTorch: the model's step, clipping, AdamW), the
same ``LatentReasoner`` and batches with ``body_forward`` = ``transformers`` (the model's own
forward for every pass), ``lean`` (``pipeline/latent/lean_forward.py``: the same arithmetic without
transformers' model-level work) and ``compiled`` (the lean stack under torch.compile),
for CoT, Coconut + SIM-CoT (16 and 14 latents: curriculum stages 8 and 7) and CODI + SIM-CoT (6
latents), at the P8 shape (hidden 64, 2 layers: host-bound) and hidden 256, 8 layers. The three
steps run in turn on the same batch (a slow spell lands on all three); median of ``--steps`` steps
after 5 warm-up on stage 7 (the timed steps alternate stages 8 and 7: a stage change). Also: the
operators dispatched per step (torch.profiler), the compile time (the first compiled step less
the median; torch's caches cleared before each case, inductor's on-disk cache as found) and the
graphs compiled after warm-up (0: no recompiles). One line per case, in a fixed form:

    compile <method> hidden=<h> layers=<l> transformers=<ms> lean=<ms> (<r>x) compiled=<ms> (<r>x)
            ops=<t>/<l>/<c> compile=<s>s recompiles=<n>        (on one line)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.overhead import CASES, batches, plain_step, reasoner

SHAPES = ((64, 2), (256, 8))
FORWARDS = ("transformers", "lean", "compiled")
WARMUP = 5


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per forward (default 20)")
    parser.add_argument("--shapes", default=",".join(f"{h}x{n}" for h, n in SHAPES),
                        help="comma-separated hidden x layers (default 64x2,256x8)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    return parser


def stage_batches(name: str) -> tuple[list, list]:
    """-> (warm-up batches, timed batches): Coconut's timed ones alternate its stages 8 and 7."""
    cfg, stage = CASES[name]
    before = batches(cfg, max(stage - 1, 0), 2)
    return before, [b for pair in zip(batches(cfg, stage, 2), before) for b in pair]


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def ops_per_step(step, batch) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(batch)
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


def measure(name: str, hidden: int, layers: int, steps: int) -> dict:
    torch._dynamo.reset()
    cfg, _ = CASES[name]
    warm, timed = stage_batches(name)
    runs = {f: plain_step(reasoner(cfg, layers, diagnostics=False, hidden=hidden, body_forward=f)) for f in FORWARDS}
    times = {forward: [] for forward in FORWARDS}
    first = {}
    for i in range(WARMUP + steps):
        if i == WARMUP:
            graphs = graphs_compiled()
        for forward, step in runs.items():
            start = time.perf_counter()
            step(warm[i % len(warm)] if i < WARMUP else timed[i % len(timed)])
            elapsed = time.perf_counter() - start
            first.setdefault(forward, elapsed)
            if i >= WARMUP:
                times[forward].append(elapsed)
    median = {forward: statistics.median(ts) for forward, ts in times.items()}
    return {"ms": {f: 1e3 * m for f, m in median.items()}, "recompiles": graphs_compiled() - graphs,
            "compile": first["compiled"] - median["compiled"],
            "ops": [ops_per_step(runs[f], timed[0]) for f in FORWARDS]}


def line(name: str, hidden: int, layers: int, r: dict) -> str:
    ms = r["ms"]
    ratio = lambda f: f"{ms[f]:.0f} ({ms[f] / ms['transformers']:.2f}x)"  # noqa: E731
    return (f"compile {name} hidden={hidden} layers={layers} transformers={ms['transformers']:.0f} "
            f"lean={ratio('lean')} compiled={ratio('compiled')} ops={'/'.join(map(str, r['ops']))} "
            f"compile={r['compile']:.0f}s recompiles={r['recompiles']}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    print("P12 how the decoder stacks run (model.body_forward): transformers' vs lean vs compiled, plain PyTorch "
          f"step (AdamW), 1 thread, fp32, batch 4, median of {args.steps} steps in turn (ms; ratios against "
          "transformers'; goal: Coconut and "
          "CODI + SIM-CoT compiled <= 0.7x at a host-bound shape, CoT not slower, 0 recompiles)", flush=True)
    for spec in args.shapes.split(","):
        hidden, layers = (int(x) for x in spec.split("x"))
        for name in args.cases.split(","):
            print(line(name, hidden, layers, measure(name, hidden, layers, args.steps)), flush=True)
