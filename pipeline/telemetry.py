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


def step_flops(batch: dict, m: FlopModel) -> float:
    """FLOPs of one micro-batch's forward + backward: every base token of every latent pass, the
    CODI teacher, the step decoder's tokens, and the LM heads at labelled positions."""
    def tokens_of(mask_key):
        mask = batch[mask_key]
        return int(mask.sum()) * flops_per_token(m.body_params, m.layers, m.hidden, mask.size(1))

    total = tokens_of("attention_mask")
    labelled = int((batch["labels"] != -100).sum())
    if "teacher_attention_mask" in batch:
        total += tokens_of("teacher_attention_mask")
        labelled += int((batch["teacher_labels"] != -100).sum())
    if m.decoder_body_params and "step_ids" in batch:
        b, s, width = batch["step_ids"].shape
        seq = width + m.decoder_prefix
        total += b * s * seq * flops_per_token(m.decoder_body_params, m.layers, m.hidden, seq)
        lengths = batch["step_lengths"]
        labelled += int((lengths + 1)[lengths > 0].sum())
    return float(total + labelled * 6 * m.vocab * m.hidden)


def body_params(lm) -> int:
    """Parameters minus the input embedding and the LM head (counted once if tied)."""
    skip = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
    return sum(getattr(p, "ds_numel", p.numel()) for p in lm.parameters() if id(p) not in skip)


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
