"""GPU check P6 (``python -m benchmarks gpu``): throughput and MFU of the SIM-CoT(CODI) step
on one GPU under DeepSpeed ZeRO-3, bf16 (fp32 master weights), SDPA attention, against the plain
CoT recipe on the same model. The model is LLaMA-3.2-1B-shaped and randomly initialised (hidden
2048, 16 layers, 32/8 heads, MLP 8192, vocab 128,256, tied embeddings); the data is synthetic
GSM8k-Aug-shaped (question ~40 tokens, 3-4 steps of ~10 tokens). FLOPs count every latent pass,
the teacher, every decoder token and the LM heads where labels exist (pipeline/engine/telemetry.py).

    python -m benchmarks gpu [--steps 50] [--batch 32] [--shape 1b|tiny]
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.fixtures import PREFIX, SPECIAL, synthetic_records
from pipeline.engine.build_model import build_reasoner
from pipeline.engine.config import load_config
from pipeline.engine.ds_config import resolve_ds_config
from pipeline.engine.gather_policy import GATHERED, apply_gather_policy, step_gather
from pipeline.engine.telemetry import FlopModel, body_params, peak_flops, step_flops
from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import layout

SHAPES = {
    "1b": ["model.tiny.hidden_size=2048", "model.tiny.num_layers=16", "model.tiny.num_heads=32",
           "model.tiny.num_kv_heads=8", "model.tiny.intermediate_size=8192"],
    "tiny": ["model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.intermediate_size=128"],
}
VOCAB = 128_256


def run_recipe(method: list[str], shape: str, steps: int, batch: int, on_cuda: bool) -> dict:
    import deepspeed

    run = load_config(None, [*SHAPES[shape], *method, f"train.micro_batch_size={batch}", "train.lr=1e-4",
                             "train.max_grad_norm=1.0", "model.attn_implementation=sdpa"])
    ds = resolve_ds_config("ds_configs/zero3.json", run, 1, run.model.tiny.hidden_size, on_cuda, bf16=on_cuda)
    ds["optimizer"]["params"]["torch_adam"] = True   # no fused-Adam JIT compile on a fresh machine
    model, attention, _keep = build_reasoner(run, VOCAB, SPECIAL["eos"], ds, on_cuda)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds)
    apply_gather_policy(engine, GATHERED)
    cfg = run.method.layout()
    flop_model = FlopModel(body_params(model.base), body_params(model.step_decoder) if model.step_decoder else 0,
                           model.base.config.num_hidden_layers, model.base.config.hidden_size, VOCAB, 1)
    device = engine.device
    batches = []
    for seed in range(4):
        records = synthetic_records(batch, VOCAB, seed=seed)
        b = collate_aligned([layout(r, SPECIAL, cfg, 0, PREFIX) for r in records], SPECIAL["latent"], SPECIAL["pad"])
        batches.append(b.to(device))
    warmup, times, flops, tokens = 5, [], 0.0, 0
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        b = batches[step % len(batches)]
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with step_gather(engine, GATHERED):
            losses = engine(b)
            engine.backward(losses["total"])
        engine.step()
        if on_cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            flops += step_flops(b, flop_model)
            teacher = b.teacher_attention_mask
            tokens += int(b.attention_mask.sum()) + (int(teacher.sum()) if teacher is not None else 0)
    elapsed = sum(times)
    peak, peak_name = peak_flops(on_cuda)
    result = {"attention": attention, "step_s": elapsed / steps, "tokens_per_s": tokens / elapsed,
              "tflops": flops / elapsed / 1e12, "mfu": flops / elapsed / peak, "peak": peak_name,
              "final_loss": float(losses["total"].detach()),
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan")}
    del engine, model
    if on_cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--recipe", choices=["cot", "codi", "both"], default="both",
                        help="run one recipe per process to measure each one's peak memory alone")
    args = parser.parse_args(argv)
    from pipeline.engine.distributed import init_distributed

    _, _, device = init_distributed()
    on_cuda = device.type == "cuda"
    if on_cuda:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    recipes = {"cot": ("CoT (baseline)", ["method.name=cot"]),
               "codi": ("SIM-CoT(CODI), 6 latents", ["method.name=codi", "method.simcot=true", "method.num_latent=6",
                                                     "method.distill_factor=20"])}
    for key, (name, method) in recipes.items():
        if args.recipe not in (key, "both"):
            continue
        r = run_recipe(method, args.shape, args.steps, args.batch, on_cuda)
        print(f"{name}: {r['step_s'] * 1000:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['tflops']:.1f} TFLOP/s, MFU {100 * r['mfu']:.1f}% of {r['peak']}, "
              f"peak memory {r['peak_mem_gib']:.1f} GiB, attention {r['attention']}, final loss {r['final_loss']:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
