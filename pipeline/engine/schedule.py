"""The learning-rate schedule: linear warm-up, then constant or cosine down to ``min_lr_ratio``.

    factor = lr_factor(step, total_steps, run.train)     # step 0 is the first optimizer step

After warm-up the cosine is HF's ``get_cosine_schedule_with_warmup`` (what the CODI reference's
Trainer runs) when ``min_lr_ratio`` is 0; ``min_lr_ratio`` 0.1 (the default) ends at a tenth of the
peak. Warm-up differs by one step on purpose: HF's first step has lr 0 (a step that changes
nothing), ours starts at peak / warm-up steps. ``warmup_ratio`` > 0 sets the warm-up as that
fraction of the run's optimizer steps (HF's ``warmup_ratio``, rounded up as HF does).
"""
from __future__ import annotations

import math

from pipeline.engine.config import TrainSettings


def warmup_steps(total_steps: int, t: TrainSettings) -> int:
    return math.ceil(t.warmup_ratio * total_steps) if t.warmup_ratio > 0 else t.warmup_steps


def lr_factor(step: int, total_steps: int, t: TrainSettings) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of a ``total_steps`` run."""
    warm = warmup_steps(total_steps, t)
    if warm and step < warm:
        return (step + 1) / warm
    if t.schedule == "constant":
        return 1.0
    done = min(1.0, (step - warm) / max(1, total_steps - warm))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))
