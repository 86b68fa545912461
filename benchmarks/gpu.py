"""GPU check P6 (``python -m benchmarks gpu``): the attention kernel x decoder stack matrix of the
training step and of greedy generation on one GPU, for CoT and SIM-CoT(CODI), under DeepSpeed ZeRO-3,
bf16 (fp32 master weights). The model is LLaMA-3.2-1B-shaped and randomly initialised (hidden 2048,
16 layers, 32/8 heads, MLP 8192, vocab 128,256, tied embeddings); the data is synthetic
GSM8k-Aug-shaped (question ~40 tokens, 3-4 steps of ~10 tokens). FLOPs count every latent pass, the
teacher, every decoder token and the LM heads where labels exist (pipeline/engine/telemetry.py).

One engine per recipe runs every cell: attention {sdpa, flash_attention_2 and flash_attention_4
where installed} x body forward {transformers, lean, compiled}, switched on the live model. A cell
prints its step time, MFU and peak memory per batch size, greedy-generation throughput, and the
kernel each kind of pass called (counted from the calls of one step and one generation; a compiled
cell's are its lean twin's, the graphs tracing the same calls). Cells run cheapest first; a cell that
would not be expected to end within ``--deadline`` seconds of the start (it is expected to take as long
as the longest so far, a compiled one at least ``--compile-estimate``) is listed as not run, so one
invocation fits its budget.

    python -m benchmarks gpu                                   # the matrix, batch 16 and 64 (about 8 min)
    python -m benchmarks gpu --attention sdpa --body-forward lean --batches 16,32,64 --profile DIR
"""
from __future__ import annotations

import argparse
import os
import time
from collections import Counter

import torch

from benchmarks.fixtures import PREFIX, SPECIAL, synthetic_records
from benchmarks.overhead import zero3_step
from pipeline.engine.build_model import build_reasoner
from pipeline.engine.config import load_config
from pipeline.engine.ds_config import resolve_ds_config, zero_stage
from pipeline.engine.gather_policy import GATHERED, REPLICATED, apply_gather_policy, step_gather
from pipeline.engine.grad_reduce import AFTER_BACKWARD, OVERLAPPED, apply_grad_reduce
from pipeline.engine.model_shapes import model_sizes
from pipeline.engine.telemetry import FlopModel, body_params, peak_flops, step_flops
from pipeline.inference.generate import latent_generate
from pipeline.latent import attention
from pipeline.latent.collate import collate_aligned
from pipeline.latent.lean_forward import resolve_body_forward
from pipeline.latent.methods import get_method, layout
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
BODIES = ("transformers", "lean", "compiled")
GENERATED = (32, 32)     # greedy generation: prompts, new tokens


def build_engine(method: list[str], args, kernel: str, body_forward: str, on_cuda: bool):
    """-> (engine, FlopModel, the method config, gather policy) for one recipe, configured as the
    trainer configures it (gradient buckets sized to the trainable parameters, the optimizer the
    DeepSpeed JSON resolves to: DeepSpeed's fused Adam on CUDA, JIT-compiled on first use)."""
    import deepspeed

    run = load_config(None, [*SHAPES[args.shape], *method, "train.micro_batch_size=16", "train.lr=1e-4",
                             "train.max_grad_norm=1.0", f"model.attn_implementation={kernel}",
                             f"model.body_forward={body_forward}",
                             f"deepspeed={args.ds_config}"])
    sizes = model_sizes(run, VOCAB)
    ds = resolve_ds_config(run.deepspeed, run, 1, sizes.hidden, on_cuda, bf16=on_cuda,
                           trainable_params=sizes.trainable)
    if args.torch_adam:
        ds["optimizer"]["params"]["torch_adam"] = True
    model, _, _keep = build_reasoner(run, Vocab(SPECIAL, VOCAB, VOCAB), ds, on_cuda)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds)
    policy = policy_of(ds)
    apply_gather_policy(engine, policy)
    apply_grad_reduce(engine, AFTER_BACKWARD if policy == GATHERED else OVERLAPPED)
    flop_model = FlopModel(body_params(model.base), body_params(model.step_decoder) if model.step_decoder else 0,
                           model.base.config.num_hidden_layers, model.base.config.hidden_size, VOCAB, 1)
    return engine, flop_model, run.method, policy


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


def switch(model, kernel: str, body_forward: str) -> None:
    """The live model's attention kernel (transformers' own switch, which loads a flash kernel) and
    decoder stack."""
    for lm in (model.base, model.step_decoder):
        if lm is not None:
            lm.set_attn_implementation(kernel)
    model.body_forward = resolve_body_forward(body_forward, model.base.config)


class CountedKernels:
    """Inside: every registered attention kernel wrapped to count its calls by pass kind; after:
    ``calls`` {kernel name: Counter of pass kinds}."""

    def __init__(self):
        self.calls: dict[str, Counter] = {}

    def __enter__(self):
        mapping = attention.ALL_ATTENTION_FUNCTIONS._global_mapping
        self.saved = dict(mapping)
        for name, kernel in self.saved.items():
            mapping[name] = self._counting(name, kernel)
        return self

    def _counting(self, name: str, kernel):
        def counted(*args, **kwargs):
            self.calls.setdefault(name, Counter())[attention.current_pass()] += 1
            return kernel(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        attention.ALL_ATTENTION_FUNCTIONS._global_mapping.update(self.saved)

    def line(self) -> str:
        return "; ".join(f"{name}: " + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items(), key=str))
                         for name, kinds in self.calls.items()) or "none counted"


def generation_throughput(engine, policy: str, cfg, on_cuda: bool) -> float:
    """Greedy problems per second of ``GENERATED`` prompts on the live model (CODI's latent prompts
    with its projection; CoT's questions), the weights gathered as in a step."""
    prompts_n, new = GENERATED
    model, sync = engine.module, torch.cuda.synchronize if on_cuda else (lambda: None)
    method = get_method(cfg.name)
    prompts = [method.prompt(cfg, r["question_ids"], SPECIAL, method.n_latents(cfg, 0, len(r["step_ids"])))
               for r in synthetic_records(prompts_n, VOCAB, seed=9)]
    latent = SPECIAL["latent"] if method.fills_latents else None
    with step_gather(engine, policy):
        model.eval()
        sync()
        start = time.perf_counter()
        latent_generate(model.base, prompts, latent, eos_id=-1, max_new_tokens=new, pad_id=SPECIAL["pad"],
                        project=model.projection, body_forward=model.body_forward)
        sync()
        model.train()
    return prompts_n / (time.perf_counter() - start)


def run_cell(engine, policy, flop_model, cfg, kernel: str, body: str, args, on_cuda: bool, name: str) -> None:
    switch(engine.module, kernel, body)
    batches = make_batches(args.batches[0], cfg, engine.device)
    with CountedKernels() as counted:        # a compiled cell traces anew with the counters: its lean twin counts
        if body != "compiled":
            zero3_step(engine, policy)(batches[0])
            generation_throughput(engine, policy, cfg, on_cuda)
    cell = f"{name} [{kernel}, {body}]"
    print(f"{cell} kernel calls per pass (one step + one generation): "
          f"{counted.line() if body != 'compiled' else 'as lean'}", flush=True)
    for batch in args.batches:
        try:
            r = time_steps(engine, policy, make_batches(batch, cfg, engine.device), args.warmup, args.steps,
                           flop_model, on_cuda)
        except torch.OutOfMemoryError:
            print(f"{cell} batch {batch}: out of memory", flush=True)
            break
        print(f"{cell} batch {batch}: {r['step_s'] * 1000:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['tflops']:.1f} TFLOP/s, MFU {100 * r['mfu']:.1f}% of {r['peak']}, "
              f"peak memory {r['peak_mem_gib']:.1f} GiB, final loss {r['final_loss']:.3f}", flush=True)
    print(f"{cell} greedy generation: {generation_throughput(engine, policy, cfg, on_cuda):.1f} problems/s "
          f"({GENERATED[0]} prompts x {GENERATED[1]} new tokens)", flush=True)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        path = os.path.join(args.profile, f"profile-{name.split()[0]}-{kernel}-{body}.txt")
        profile_steps(engine, policy, make_batches(args.batches[-1], cfg, engine.device), path, on_cuda)


def cells(kernels: list[str], bodies: list[str]) -> list[tuple[str, str]]:
    """Every (kernel, body) pair, eager stacks first (compiled ones compile for minutes)."""
    return sorted(((k, b) for k in kernels for b in bodies), key=lambda cell: (cell[1] == "compiled", bodies.index(
        cell[1]), kernels.index(cell[0])))


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    parser.add_argument("--attention", type=lambda s: s.split(","), default=None,
                        help="attention kernels, comma-separated (default: sdpa and every flash kernel installed)")
    parser.add_argument("--body-forward", type=lambda s: s.split(","), default=list(BODIES),
                        help="model.body_forward values, comma-separated (default: transformers,lean,compiled)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--recipe", choices=[*RECIPES, "both"], default="both")
    parser.add_argument("--deadline", type=float, default=450.0,
                        help="seconds from start by which every cell that starts must be expected to end (default "
                             "450: the matrix in 8 minutes); a cell is expected to take as long as the longest so far")
    parser.add_argument("--compile-estimate", type=float, default=150.0,
                        help="seconds a compiled cell is expected to take at least (its graphs compile)")
    parser.add_argument("--ds-config", default="ds_configs/zero3.json",
                        help="the DeepSpeed JSON (ds_configs/zero2.json: no gathers)")
    parser.add_argument("--torch-adam", action="store_true",
                        help="torch's AdamW instead of DeepSpeed's fused Adam (no JIT compile on a fresh machine)")
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler table of 3 steps per cell here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from pipeline.engine.distributed import init_distributed

    start = time.monotonic()
    _, _, device = init_distributed()
    on_cuda = device.type == "cuda"
    if on_cuda:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    kernels = args.attention or ["sdpa"] + [k for k, ok in attention.flash_kernels(on_cuda).items() if ok]
    kernels = list(dict.fromkeys(attention.pick_attention(k, on_cuda, "--attention") for k in kernels))
    skipped, longest = [], 0.0
    for key in [k for k in RECIPES if args.recipe in (k, "both")]:
        name, method = RECIPES[key]
        engine, flop_model, cfg, policy = build_engine(method, args, "sdpa", "lean", on_cuda)
        for kernel, body in cells(kernels, args.body_forward):
            expected = max(longest, args.compile_estimate if body == "compiled" else 0.0)
            if time.monotonic() - start + expected > args.deadline:
                skipped.append(f"{name} [{kernel}, {body}]")
                continue
            began = time.monotonic()
            run_cell(engine, policy, flop_model, cfg, kernel, body, args, on_cuda, name)
            took = time.monotonic() - began
            longest = max(longest, took)
            print(f"  ({took:.0f} s)", flush=True)
        del engine
        if on_cuda:
            torch.cuda.empty_cache()
    print(f"matrix done in {time.monotonic() - start:.0f} s; not run (expected past --deadline {args.deadline:.0f} s): "
          f"{', '.join(skipped) or 'none'}", flush=True)


if __name__ == "__main__":
    main()
