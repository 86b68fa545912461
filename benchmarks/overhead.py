"""Benchmark P8 (``python -m benchmarks overhead``): the ZeRO-3 engine's fixed per-step cost.

1 rank, fp32, a host-bound tiny LLaMA (hidden 64, vocab 512, batch 4): the ZeRO-3 engine step as
the trainer runs it (``engine(b)``, ``engine.backward``, ``engine.step`` under what the memory plan
picks for a model this small: the ``gathered`` policy, gradients reduced after backward;
``--grad-reduce overlapped`` times DeepSpeed's per-parameter hooks) against the very same
``LatentReasoner``, batches and AdamW in plain PyTorch eager (``model(b)``, ``backward``,
``clip_grad_norm_``, ``opt.step``), for CoT, Coconut + SIM-CoT (16 latents) and CODI + SIM-CoT (6
latents) at 2 and 8 layers, at 1 thread and at the machine's default. Each side runs in a clean
process of its own, 2 steps at a time in turn (benchmarks/in_turn.py); median and min-max of 40
timed steps after 5 warm-up. One line per case, in a fixed form to compare run to run:

    overhead <method> layers=<n> threads=<t> zero3=<ms> plain=<ms> ratio=<r>x
"""
from __future__ import annotations

import argparse
import gc
import statistics

import torch

from benchmarks.fixtures import PREFIX, SPECIAL, bench_model, synthetic_records
from benchmarks.in_turn import Side, in_turn, timed_forever
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
                 diagnostics: bool = False, one_rank_partitions: bool = True):
    """The trainer's engine: resolved zero3.json, model built under zero.Init, the gathered policy
    (``one_rank_partitions``: pipeline/engine/gather_policy.py)."""
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
    apply_gather_policy(engine, GATHERED, one_rank_partitions=one_rank_partitions)
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


def zero3_side(pace, case: str, layers: int, grad_reduce: str = AFTER_BACKWARD, diagnostics: bool = False) -> None:
    """The engine's step, in a process of its own (benchmarks/in_turn.py)."""
    from pipeline.engine.distributed import init_distributed, teardown

    init_distributed()
    cfg, stage = CASES[case]
    try:
        engine, policy = zero3_engine(cfg, layers, grad_reduce=grad_reduce, diagnostics=diagnostics)
        timed_forever(zero3_step(engine, policy), batches(cfg, stage), pace)
    finally:
        teardown()


def plain_side(pace, case: str, layers: int, diagnostics: bool = False) -> None:
    """The same model, batches and AdamW in plain PyTorch, in a clean process."""
    cfg, stage = CASES[case]
    timed_forever(plain_step(reasoner(cfg, layers, diagnostics)), batches(cfg, stage), pace)


def measure(name: str, layers: int, threads: int, steps: int = 20, warmup: int = 5, grad_reduce: str = AFTER_BACKWARD,
            diagnostics: bool = False) -> dict:
    """Both sides of one case, each in its own process, in turn -> their step times and the ratio."""
    sides = {"zero3": Side(__name__, "zero3_side", {"case": name, "layers": layers, "grad_reduce": grad_reduce,
                                                      "diagnostics": diagnostics}),
             "plain": Side(__name__, "plain_side", {"case": name, "layers": layers, "diagnostics": diagnostics})}
    times = in_turn(sides, threads, warmup, steps, chunk=2)
    return {**times, "ratio": statistics.median(times["zero3"]) / statistics.median(times["plain"])}


def line(name: str, layers: int, threads: int, r: dict) -> str:
    ms = lambda xs: f"{1000 * statistics.median(xs):.1f}"  # noqa: E731
    spread = lambda xs: f"{1000 * min(xs):.0f}-{1000 * max(xs):.0f}"  # noqa: E731
    return (f"overhead {name} layers={layers} threads={threads} zero3={ms(r['zero3'])} plain={ms(r['plain'])} "
            f"ratio={r['ratio']:.2f}x   (min-max ms: zero3 {spread(r['zero3'])}, plain {spread(r['plain'])})")


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per side after 5 warm-up (default 40)")
    parser.add_argument("--layers", default="2,8", help="comma-separated layer counts")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--grad-reduce", default=AFTER_BACKWARD, choices=GRAD_REDUCES,
                        help="when ZeRO-3 reduces gradients (pipeline/engine/grad_reduce.py; default: the plan's pick)")
    parser.add_argument("--diagnostics", action="store_true",
                        help="the latents' collapse diagnostics in every step (the trainer: printed steps only)")
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                        help="comma-separated torch thread counts, each side alike (default: 1 and this machine's)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print("P8 engine overhead: ZeRO-3 step vs plain PyTorch eager, each in a clean process, 1 rank, fp32, hidden "
          f"64, vocab 512, batch 4, gradients reduced {args.grad_reduce}, diagnostics "
          f"{'on' if args.diagnostics else 'off'} (goal ratio <= 1.15x at every thread count)", flush=True)
    for threads in (int(x) for x in dict.fromkeys(args.threads.split(","))):
        for layers in (int(x) for x in args.layers.split(",")):
            for name in args.cases.split(","):
                result = measure(name, layers, threads, args.steps, grad_reduce=args.grad_reduce,
                                 diagnostics=args.diagnostics)
                print(line(name, layers, threads, result), flush=True)
