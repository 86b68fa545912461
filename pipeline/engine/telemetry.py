"""Metrics: TensorBoard scalars + ``metrics.jsonl`` (rank 0), FLOPs and MFU, a progress line.

FLOPs: 6 N per token for the weight matmuls forward + backward, plus the attention term
12 * layers * hidden * context per token (PaLM appendix B, as nanochat counts it). Every token
the base model processes counts once per pass it goes through: the question, every latent pass,
the tail, the CODI teacher; the step decoder's tokens count against the decoder's size.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from pipeline.engine.guard import keep_or_poison
from pipeline.latent.batch import Batch

# Dense bf16 peak per device, FLOP/s (vendor datasheets, no sparsity).
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(on_cuda: bool) -> tuple[float, str]:
    if on_cuda:
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"{name} (datasheet bf16)"
        return 989e12, f"{name} (unknown: assuming H100 bf16)"
    return measured_cpu_peak(), "CPU (measured fp32 matmul)"


def measured_cpu_peak(size: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def flops_per_token(n_params: int, layers: int, hidden: int, context: int) -> float:
    return 6 * n_params + 12 * layers * hidden * context


@dataclass(frozen=True)
class FlopModel:
    """Sizes for FLOP counting. ``body_params`` excludes the embedding and LM head: the embedding
    is a lookup, and the LM head runs only where a label exists (its FLOPs are counted there)."""
    body_params: int
    decoder_body_params: int
    layers: int
    hidden: int
    vocab: int
    decoder_prefix: int   # latents in front of each step in the decoder (c for Coconut, 1 for CODI)
    latent_reruns: int = 0  # Jacobi iterations: each runs every latent column once more


def step_flops(batch: Batch, m: FlopModel) -> float:
    """FLOPs of one micro-batch's forward + backward: every base token of every latent pass, the
    CODI teacher, the step decoder's tokens, and the LM heads at labelled positions."""
    def tokens_of(mask):
        return int(mask.sum()) * flops_per_token(m.body_params, m.layers, m.hidden, mask.size(1))

    total = tokens_of(batch.attention_mask)
    if m.latent_reruns and batch.n_latents:
        mask = batch.attention_mask
        reruns = m.latent_reruns * batch.n_latents * mask.size(0)
        total += reruns * flops_per_token(m.body_params, m.layers, m.hidden, mask.size(1))
    labelled = int((batch.labels != -100).sum())
    if batch.teacher_attention_mask is not None:
        total += tokens_of(batch.teacher_attention_mask)
        labelled += int((batch.teacher_labels != -100).sum())
    if m.decoder_body_params and batch.step_ids is not None:
        b, s, width = batch.step_ids.shape
        seq = width + m.decoder_prefix
        total += b * s * seq * flops_per_token(m.decoder_body_params, m.layers, m.hidden, seq)
        lengths = batch.step_lengths
        labelled += int((lengths + 1)[lengths > 0].sum())
    return float(total + labelled * 6 * m.vocab * m.hidden)


def body_params(lm) -> int:
    """Parameters minus the input embedding and the LM head (counted once if tied)."""
    skip = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
    return sum(getattr(p, "ds_numel", p.numel()) for p in lm.parameters() if id(p) not in skip)


class StepMeter:
    """One optimizer step's metrics with one all-reduce and one host sync: losses are summed on
    the device as the micro-batches come (no ``.item()`` per loss), token and FLOP counts come from
    the batch while it is still on the CPU; :meth:`reduce` all-reduces everything in one tensor
    before the step's last backward (the guard's multiplier comes from it, pipeline/engine/guard.py),
    :meth:`finish` reads it back once after the optimizer step. The first ``warmup`` steps of a
    process are left out of the step time behind the ETA (start-up, allocator growth)."""

    def __init__(self, flop_model: FlopModel, peak: float, world: int, device: torch.device, warmup: int = 3):
        self.flop_model, self.peak, self.world, self.device, self.warmup = flop_model, peak, world, device, warmup
        self.timed: list[float] = []
        self.seen = 0
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = [0.0, 0.0, 0.0]           # tokens, samples, FLOPs
        self.reduced: tuple[list[str], torch.Tensor] | None = None
        self.start = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], cpu_batch: Batch) -> None:
        for key, value in losses.items():
            total = value.detach().double()
            self.sums[key] = self.sums[key] + total if key in self.sums else total
        self.counts[0] += int(cpu_batch.attention_mask.sum())
        self.counts[1] += cpu_batch.input_ids.size(0)
        self.counts[2] += step_flops(cpu_batch, self.flop_model)

    def reduce(self) -> torch.Tensor:
        """Sum the step's losses and counts over the ranks (same cadence on every rank: no hang)
        -> :func:`keep_or_poison` of the summed total loss, on the device."""
        import torch.distributed as dist

        keys = sorted(self.sums)
        packed = torch.cat([torch.stack([self.sums[k] for k in keys]),
                            torch.tensor(self.counts, dtype=torch.float64, device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(packed)
        self.reduced = (keys, packed)
        return keep_or_poison(packed[keys.index("total")])

    def finish(self, micro_batches: int, steps_left: int) -> dict[str, float]:
        """Means over micro-batches and ranks, throughput, MFU (%), step time, ETA, memory."""
        keys, packed = self.reduced
        values = packed.tolist()                # the step's one device-to-host sync
        elapsed = time.perf_counter() - self.start
        self.seen += 1
        if self.seen > self.warmup:
            self.timed.append(elapsed)
        n = len(keys)
        metrics = {(f"latent/{k}" if "latent" in k else f"loss/{k}"): values[i] / (micro_batches * self.world)
                   for i, k in enumerate(keys)}
        step_time = sum(self.timed) / len(self.timed) if self.timed else elapsed
        metrics.update({"throughput/tokens_per_s": values[n] / elapsed,
                        "throughput/samples_per_s": values[n + 1] / elapsed,
                        "mfu(%)": 100 * values[n + 2] / elapsed / (self.peak * self.world),
                        "time/step_s": elapsed, "time/eta_s": step_time * steps_left, **memory_gib(self.device)})
        self._reset()
        return metrics


def format_eta(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


def memory_gib(device: torch.device) -> dict[str, float]:
    """Peak memory of this rank: the CUDA caching allocator's maxima on a GPU, peak RSS on a CPU."""
    if device.type == "cuda":
        return {"memory/max_allocated(GiB)": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory/max_reserved(GiB)": torch.cuda.max_memory_reserved(device) / 2**30}
    import resource

    return {"memory/max_rss(GiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}   # ru_maxrss: KiB


class MetricsLog:
    """Rank 0 writes; other ranks hold a no-op log."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def event(self, step: int, kind: str, count: int, message: str, fields: dict) -> None:
        """A finding of the guard: a row of its own in ``metrics.jsonl`` (``"event": kind``), its text
        and its running count (``events/KIND``) in TensorBoard."""
        if not self.enabled:
            return
        self.writer.add_text(f"events/{kind}", message, step)
        self.writer.add_scalar(f"events/{kind}", count, step)
        self.jsonl.write(json.dumps({"step": step, "event": kind, "message": message, **fields}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
