"""GPU check P6 (``python -m benchmarks gpu``): throughput and MFU of the SIM-CoT(CODI) step
on one GPU under DeepSpeed ZeRO-3, bf16 (fp32 master weights), against the plain CoT recipe on
the same model, over a sweep of batch sizes and attention kernels. The model is LLaMA-3.2-1B-shaped
and randomly initialised (hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocab 128,256, tied
embeddings); the data is synthetic GSM8k-Aug-shaped (question ~40 tokens, 3-4 steps of ~10 tokens).
FLOPs count every latent pass, the teacher, every decoder token and the LM heads where labels
exist (pipeline/engine/telemetry.py). One engine per (recipe, attention) runs every batch size, and
a least-squares line through (batch, step time) gives the fixed per-step cost. ``--body-forward``
compares how the decoder stacks run (transformers' model, the lean forward, the compiled one: P12).

    python -m benchmarks gpu [--batches 16,32,64] [--attention sdpa,auto] [--steps 10] [--profile DIR]
    python -m benchmarks gpu --body-forward transformers,lean,compiled --recipe both   # the #28 check
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.fixtures import PREFIX, SPECIAL, synthetic_records
from benchmarks.overhead import zero3_step
from pipeline.engine.build_model import build_reasoner
from pipeline.engine.config import load_config
from pipeline.engine.ds_config import resolve_ds_config, zero_stage
from pipeline.engine.gather_policy import GATHERED, REPLICATED, apply_gather_policy
from pipeline.engine.grad_reduce import AFTER_BACKWARD, OVERLAPPED, apply_grad_reduce
from pipeline.engine.model_shapes import model_sizes
from pipeline.engine.telemetry import FlopModel, body_params, peak_flops, step_flops
from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import layout
from pipeline.latent.vocab import Vocab

SHAPES = {
    "1b": ["model.tiny.hidden_size=2048", "model.tiny.num_layers=16", "model.tiny.num_heads=32",
           "model.tiny.num_kv_heads=8", "model.tiny.intermediate_size=8192"],
    "tiny": ["model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.intermediate_size=128"],
}
RECIPES = {"cot": ("CoT (baseline)", ["method.name=cot"]),
           "codi": ("SIM-CoT(CODI), 6 latents", ["method.name=codi", "method.simcot=true", "method.num_latent=6",
                                                 "method.distill_factor=20"])}
VOCAB = 128_256


def build_engine(method: list[str], args, attention: str, body_forward: str, on_cuda: bool):
    """-> (engine, the attention that runs, FlopModel, layout, gather policy) for one recipe, configured as the
    trainer configures it (gradient buckets sized to the trainable parameters, the optimizer the
    DeepSpeed JSON resolves to: DeepSpeed's fused Adam on CUDA, JIT-compiled on first use)."""
    import deepspeed

    run = load_config(None, [*SHAPES[args.shape], *method, "train.micro_batch_size=16", "train.lr=1e-4",
                             "train.max_grad_norm=1.0", f"model.attn_implementation={attention}",
                             f"model.body_forward={body_forward}",
                             f"deepspeed={args.ds_config}"])
    sizes = model_sizes(run, VOCAB)
    ds = resolve_ds_config(run.deepspeed, run, 1, sizes.hidden, on_cuda, bf16=on_cuda,
                           trainable_params=sizes.trainable)
    if args.torch_adam:
        ds["optimizer"]["params"]["torch_adam"] = True
    model, attention, _keep = build_reasoner(run, Vocab(SPECIAL, VOCAB, VOCAB), ds, on_cuda)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds)
    policy = policy_of(ds)
    apply_gather_policy(engine, policy)
    apply_grad_reduce(engine, AFTER_BACKWARD if policy == GATHERED else OVERLAPPED)
    flop_model = FlopModel(body_params(model.base), body_params(model.step_decoder) if model.step_decoder else 0,
                           model.base.config.num_hidden_layers, model.base.config.hidden_size, VOCAB, 1)
    return engine, attention, flop_model, run.method, policy


def policy_of(ds: dict) -> str:
    """The trainer's choice on a model that fits: pinned under ZeRO-3 (gradients then reduced after
    backward), nothing to gather below it."""
    return GATHERED if zero_stage(ds) == 3 else REPLICATED


def make_batches(batch: int, cfg, device) -> list:
    out = []
    for seed in range(4):
        records = synthetic_records(batch, VOCAB, seed=seed)
        b = collate_aligned([layout(r, SPECIAL, cfg, 0, PREFIX) for r in records], SPECIAL["latent"], SPECIAL["pad"])
        out.append(b.to(device))
    return out


def time_steps(engine, policy: str, batches, warmup: int, steps: int, flop_model, on_cuda: bool) -> dict:
    """Totals over ``steps`` timed steps after ``warmup``: MFU is all their FLOPs over all their time."""
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    elapsed, flops, tokens = 0.0, 0.0, 0
    train_step = zero3_step(engine, policy)
    for step in range(warmup + steps):
        b = batches[step % len(batches)]
        sync()
        start = time.perf_counter()
        loss = train_step(b)
        sync()
        if step >= warmup:
            elapsed += time.perf_counter() - start
            flops += step_flops(b, flop_model)
            teacher = b.teacher_attention_mask
            tokens += int(b.attention_mask.sum()) + (int(teacher.sum()) if teacher is not None else 0)
    peak, peak_name = peak_flops(on_cuda)
    return {"step_s": elapsed / steps, "tokens_per_s": tokens / elapsed, "tflops": flops / elapsed / 1e12,
            "mfu": flops / elapsed / peak, "peak": peak_name, "final_loss": float(loss),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan")}


def fixed_cost(points: dict[int, float]) -> tuple[float, float] | None:
    """Least-squares ``step = fixed + per_sample * batch`` -> (fixed seconds, per-sample seconds)."""
    if len(points) < 2:
        return None
    xs, ys = list(points), list(points.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def profile_steps(engine, policy: str, batches, path: str, on_cuda: bool) -> None:
    """Three steps under torch.profiler; the op table sorted by device (else CPU) time goes to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    train_step = zero3_step(engine, policy)
    with profile(activities=activities) as prof:
        for b in batches[:3]:
            train_step(b)
        if on_cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    with open(path, "w", encoding="utf-8") as f:
        for key in (["cuda_time_total"] if on_cuda else []) + ["cpu_time_total"]:
            f.write(f"# 3 steps, sorted by {key}\n{averages.table(sort_by=key, row_limit=40)}\n")
    print(f"  profile of 3 steps: {path}", flush=True)


def sweep(key: str, attention: str, body_forward: str, args, on_cuda: bool) -> None:
    name, method = RECIPES[key]
    engine, ran, flop_model, cfg, policy = build_engine(method, args, attention, body_forward, on_cuda)
    ran = f"{ran}, {engine.module.body_forward}"
    points, batches = {}, []
    for batch in args.batches:
        try:
            batches = make_batches(batch, cfg, engine.device)
            r = time_steps(engine, policy, batches, args.warmup, args.steps, flop_model, on_cuda)
        except torch.OutOfMemoryError:
            print(f"{name} [{ran}] batch {batch}: out of memory", flush=True)
            break
        points[batch] = r["step_s"]
        print(f"{name} [{ran}] batch {batch}: {r['step_s'] * 1000:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['tflops']:.1f} TFLOP/s, MFU {100 * r['mfu']:.1f}% of {r['peak']}, "
              f"peak memory {r['peak_mem_gib']:.1f} GiB, final loss {r['final_loss']:.3f}", flush=True)
    fit = fixed_cost(points)
    if fit:
        ref = points.get(32, max(points.values()))
        print(f"{name} [{ran}] fixed cost per step {fit[0] * 1000:.0f} ms = {100 * fit[0] / ref:.0f}% of the "
              f"batch-{32 if 32 in points else max(points)} step; {fit[1] * 1000:.2f} ms per sample", flush=True)
    if args.profile and batches:
        os.makedirs(args.profile, exist_ok=True)
        path = os.path.join(args.profile, f"profile-{key}-{ran.replace(', ', '-')}.txt")
        profile_steps(engine, policy, batches, path, on_cuda)
    del engine
    if on_cuda:
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64])
    parser.add_argument("--attention", type=lambda s: s.split(","), default=["sdpa"],
                        help="model.attn_implementation values to run, comma-separated (sdpa, flash_attention_4, ...)")
    parser.add_argument("--body-forward", type=lambda s: s.split(","), default=["auto"],
                        help="model.body_forward values to run, comma-separated (transformers, lean, compiled)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--recipe", choices=[*RECIPES, "both"], default="both")
    parser.add_argument("--ds-config", default="ds_configs/zero3.json",
                        help="the DeepSpeed JSON (ds_configs/zero2.json: no gathers)")
    parser.add_argument("--torch-adam", action="store_true",
                        help="torch's AdamW instead of DeepSpeed's fused Adam (no JIT compile on a fresh machine)")
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler table of 3 steps per run here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from pipeline.engine.build_model import pick_attention
    from pipeline.engine.distributed import init_distributed

    _, _, device = init_distributed()
    on_cuda = device.type == "cuda"
    if on_cuda:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for attention in dict.fromkeys(pick_attention(a, on_cuda) for a in args.attention):
        for body_forward in args.body_forward:
            for key in RECIPES:
                if args.recipe in (key, "both"):
                    sweep(key, attention, body_forward, args, on_cuda)


if __name__ == "__main__":
    main()
