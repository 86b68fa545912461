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

import torch

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


def step_flops(batch: dict, base_params: int, decoder_params: int, layers: int, hidden: int,
               decoder_prefix: int) -> float:
    """FLOPs of one micro-batch's forward + backward, every latent pass and decoder token counted."""
    tokens = int(batch["attention_mask"].sum())
    context = batch["attention_mask"].size(1)
    total = tokens * flops_per_token(base_params, layers, hidden, context)
    if "teacher_attention_mask" in batch:
        teacher = int(batch["teacher_attention_mask"].sum())
        total += teacher * flops_per_token(base_params, layers, hidden, batch["teacher_attention_mask"].size(1))
    if decoder_params and "step_ids" in batch:
        b, s, width = batch["step_ids"].shape
        seq = width + decoder_prefix
        total += b * s * seq * flops_per_token(decoder_params, layers, hidden, seq)
    return float(total)


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

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
