"""Benchmark P9: Jacobi (parallel) latent updates against sequential filling, same process
(``python -m benchmarks jacobi [--repeats 7]``).

For M = 6 and 16 latents and T = 3 iterations (PCCoT's setting), alternating the two on the same
weights and batch: one CODI + SIM-CoT training step (forward + backward of ``LatentReasoner``,
batch 8) and batched generation (16 problems, 16 new tokens). Two shapes: ``host-bound`` (hidden
64, 2 layers: per-call cost dominates, as on a GPU at these batch sizes) and ``compute-bound``
(hidden 256, 4 layers, on 2 CPU threads). One line per case:
``jacobi <what> <shape> M=<m> T=<t> sequential=<ms> jacobi=<ms> ratio=<r>x``.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from benchmarks.fixtures import PREFIX, SPECIAL, bench_model, latent_prompts, synthetic_records
from pipeline.inference.generate import latent_generate
from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import MethodConfig, layout
from pipeline.latent.reasoner import LatentReasoner

SHAPES = {"host-bound": {"hidden": 64, "layers": 2}, "compute-bound": {"hidden": 256, "layers": 4}}
VOCAB = 1000


def _median_ms(fn, repeats: int, rival) -> tuple[float, float]:
    """Median ms of ``fn`` and of ``rival``, alternated after one warm-up each."""
    fn(), rival()
    ours, theirs = [], []
    for _ in range(repeats):
        for out, f in ((ours, fn), (theirs, rival)):
            start = time.perf_counter()
            f()
            out.append(1000 * (time.perf_counter() - start))
    return statistics.median(ours), statistics.median(theirs)


def train_step(shape: dict, n_latents: int, iterations: int, repeats: int) -> tuple[float, float]:
    sequential = MethodConfig("codi", num_latent=n_latents, simcot=True)
    jacobi = dataclasses.replace(sequential, latent_update="jacobi", jacobi_iterations=iterations)
    batch = collate_aligned([layout(r, SPECIAL, sequential, 0, PREFIX) for r in synthetic_records(8, VOCAB)],
                            SPECIAL["latent"], SPECIAL["pad"])
    models = {}
    for cfg in (sequential, jacobi):
        models[cfg.latent_update] = LatentReasoner(bench_model(VOCAB, shape["layers"], shape["hidden"]),
                                                   cfg, eos_id=SPECIAL["eos"])

    def step(model):
        model.zero_grad(set_to_none=True)
        model(batch)["total"].backward()

    return _median_ms(lambda: step(models["sequential"]), repeats, lambda: step(models["jacobi"]))


@torch.no_grad()
def generation(shape: dict, n_latents: int, iterations: int, repeats: int) -> tuple[float, float]:
    model = bench_model(VOCAB, shape["layers"], shape["hidden"]).eval()
    batch = latent_prompts(16, VOCAB, n_latents)
    run = lambda jacobi: latent_generate(model, batch, SPECIAL["latent"], eos_id=-1, max_new_tokens=16,  # noqa: E731
                                         jacobi_iterations=jacobi)
    return _median_ms(lambda: run(None), repeats, lambda: run(iterations))


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks jacobi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each, alternated (default 7)")
    parser.add_argument("--iterations", type=int, default=3, help="Jacobi iterations T (default 3)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(2)
    for what, bench in (("train-step", train_step), ("generate", generation)):
        for shape_name, shape in SHAPES.items():
            for n_latents in (6, 16):
                seq_ms, jac_ms = bench(shape, n_latents, args.iterations, args.repeats)
                print(f"jacobi {what} {shape_name} M={n_latents} T={args.iterations} sequential={seq_ms:.1f} "
                      f"jacobi={jac_ms:.1f} ratio={jac_ms / seq_ms:.2f}x", flush=True)
