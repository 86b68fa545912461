"""Benchmark P8 (``python -m benchmarks overhead``): the ZeRO-3 engine's fixed per-step cost.

In one process (1 rank, 1 thread, fp32, a host-bound tiny LLaMA: hidden 64, vocab 512, batch 4):
the ZeRO-3 engine step as the trainer runs it (``engine(b)``, ``engine.backward``, ``engine.step``
under what the memory plan picks for a model this small: the ``gathered`` policy, gradients
reduced after backward; ``--grad-reduce overlapped`` times DeepSpeed's per-parameter hooks)
against the very same ``LatentReasoner``, batches and AdamW in plain PyTorch eager (``model(b)``,
``backward``, ``clip_grad_norm_``, ``opt.step``), for CoT, Coconut + SIM-CoT (16 latents) and
CODI + SIM-CoT (6 latents) at 2 and 8 layers. Median and min-max of 20 timed steps after 5
warm-up. The two run in the same process, step by step in turn (zero3, plain, zero3, ...), so a
slower spell of a shared machine slows both alike rather than one whole side. One line per case,
in a fixed form to compare run to run:

    overhead <method> layers=<n> zero3=<ms> plain=<ms> ratio=<r>x
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from benchmarks.fixtures import PREFIX, SPECIAL, bench_model, synthetic_records
from pipeline.engine.grad_reduce import AFTER_BACKWARD, GRAD_REDUCES, apply_grad_reduce
from pipeline.latent.batch import Batch
from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import MethodConfig, layout
from pipeline.latent.reasoner import LatentReasoner

VOCAB, HIDDEN, BATCH = 512, 64, 4
CASES = {
    "cot": (MethodConfig("cot"), 0),
    "coconut+simcot": (MethodConfig("coconut", c_thought=2, max_latent_stage=8, simcot=True), 8),  # 16 latents
    "codi+simcot": (MethodConfig("codi", num_latent=6, simcot=True), 0),
}


def reasoner(cfg: MethodConfig, layers: int, diagnostics: bool = True, hidden: int = HIDDEN,
             body_forward: str = "auto") -> LatentReasoner:
    """The benchmarks' LLaMA (bench_latent.bench_model: 4x MLP, 8 heads) at the P8 shape (or another
    ``hidden``); ``diagnostics``: the latents' collapse diagnostics in every forward (the trainer:
    printed steps only); ``body_forward``: how the decoder stacks run (benchmark P12)."""
    decoder = bench_model(VOCAB, layers, hidden) if cfg.simcot else None
    model = LatentReasoner(bench_model(VOCAB, layers, hidden), cfg, eos_id=SPECIAL["eos"], step_decoder=decoder,
                           body_forward=body_forward)
    model.diagnostics = diagnostics
    return model


def batches(cfg: MethodConfig, stage: int, n: int = 4) -> list[Batch]:
    return [collate_aligned([layout(r, SPECIAL, cfg, stage, PREFIX) for r in synthetic_records(BATCH, VOCAB, seed)],
                            SPECIAL["latent"], SPECIAL["pad"]) for seed in range(n)]


def zero3_engine(cfg: MethodConfig, layers: int, lr: float = 1e-4, grad_reduce: str = AFTER_BACKWARD,
                 diagnostics: bool = False):
    """The trainer's engine: resolved zero3.json, model built under zero.Init, the gathered policy."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.engine.config import load_config
    from pipeline.engine.ds_config import resolve_ds_config
    from pipeline.engine.gather_policy import GATHERED, apply_gather_policy

    run = load_config(None, [f"train.micro_batch_size={BATCH}", f"train.lr={lr}", "train.max_grad_norm=1.0"])
    probe = reasoner(cfg, layers)
    trainable = sum(p.numel() for p in probe.parameters())
    ds = resolve_ds_config("ds_configs/zero3.json", run, 1, HIDDEN, on_cuda=False, bf16=False,
                           trainable_params=trainable)
    keep_alive = HfDeepSpeedConfig(ds)  # noqa: F841  (zero.Init while the model is built)
    model = reasoner(cfg, layers, diagnostics)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    apply_gather_policy(engine, GATHERED)
    apply_grad_reduce(engine, grad_reduce)
    del keep_alive
    gc.collect()
    return engine, GATHERED


def zero3_step(engine, policy: str):
    """One training step as the trainer runs it (gather policy, forward, backward, step) -> the loss."""
    from pipeline.engine.gather_policy import step_gather

    def step(batch: Batch) -> torch.Tensor:
        with step_gather(engine, policy):
            losses = engine(batch)
            engine.backward(losses["total"])
        engine.step()
        return losses["total"].detach()
    return step


def plain_step(model: LatentReasoner, lr: float = 1e-4):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(batch: Batch) -> torch.Tensor:
        losses = model(batch)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return losses["total"].detach()
    return step


def timed_in_turn(steps: dict, data: list[Batch], n: int, warmup: int) -> dict[str, list[float]]:
    """Each step of ``steps`` on the same batch, one after the other, ``warmup + n`` times."""
    times = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            start = time.perf_counter()
            step(data[i % len(data)])
            times[name].append(time.perf_counter() - start)
    return {name: ts[warmup:] for name, ts in times.items()}


def measure(name: str, layers: int, steps: int = 20, warmup: int = 5, grad_reduce: str = AFTER_BACKWARD,
            diagnostics: bool = False) -> dict:
    cfg, stage = CASES[name]
    data = batches(cfg, stage)
    engine, policy = zero3_engine(cfg, layers, grad_reduce=grad_reduce, diagnostics=diagnostics)
    times = timed_in_turn({"zero3": zero3_step(engine, policy),
                           "plain": plain_step(reasoner(cfg, layers, diagnostics))}, data, steps, warmup)
    del engine
    gc.collect()
    return {**times, "ratio": statistics.median(times["zero3"]) / statistics.median(times["plain"])}


def line(name: str, layers: int, r: dict) -> str:
    ms = lambda xs: f"{1000 * statistics.median(xs):.0f}"  # noqa: E731
    spread = lambda xs: f"{1000 * min(xs):.0f}-{1000 * max(xs):.0f}"  # noqa: E731
    return (f"overhead {name} layers={layers} zero3={ms(r['zero3'])} plain={ms(r['plain'])} ratio={r['ratio']:.2f}x"
            f"   (min-max ms: zero3 {spread(r['zero3'])}, plain {spread(r['plain'])})")


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layers", default="2,8", help="comma-separated layer counts")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--grad-reduce", default=AFTER_BACKWARD, choices=GRAD_REDUCES,
                        help="when ZeRO-3 reduces gradients (pipeline/engine/grad_reduce.py; default: the plan's pick)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="the latents' collapse diagnostics in every step (the trainer: printed steps only)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    from pipeline.engine.distributed import init_distributed

    init_distributed()
    print("P8 engine overhead: ZeRO-3 step vs plain PyTorch eager, 1 rank, 1 thread, fp32, hidden 64, vocab 512, "
          f"batch 4, gradients reduced {args.grad_reduce}, diagnostics {'on' if args.diagnostics else 'off'} "
          "(goal ratio <= 1.25x)", flush=True)
    for layers in (int(x) for x in args.layers.split(",")):
        for name in args.cases.split(","):
            result = measure(name, layers, args.steps, grad_reduce=args.grad_reduce, diagnostics=args.diagnostics)
            print(line(name, layers, result), flush=True)
