"""Batch examples so the first latent sits in the same column in every row (KV reuse, one
latent loop for the whole batch), then right-pad; position ids 0 on pads, 0..len-1 on tokens."""
from __future__ import annotations

import torch

from pipeline.latent.batch import Batch
from pipeline.latent.methods import IGNORE, Example


def _pad_rows(rows: list[list[int]], left: list[int], fill: int) -> torch.Tensor:
    width = max(pad + len(r) for pad, r in zip(left, rows))
    return torch.tensor([[fill] * pad + r + [fill] * (width - pad - len(r)) for pad, r in zip(left, rows)])


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0..len-1 over each row's real tokens, 0 on pads."""
    return ((mask.cumsum(1) - 1) * mask).long()


def align_rows(rows: list[list[int]], anchors: list[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Left-pad so every row's anchor index lands in one column, right-pad to the widest row;
    -> (ids, attention mask, position ids)."""
    left = [max(anchors) - a for a in anchors]
    mask = _pad_rows([[1] * len(r) for r in rows], left, 0)
    return _pad_rows(rows, left, pad_id), mask, positions_from_mask(mask)


def _aligned(ids: list[list[int]], labels: list[list[int]], first: list[int], pad_id: int) -> dict:
    input_ids, mask, positions = align_rows(ids, first, pad_id)
    left = [max(first) - f for f in first]
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
            "labels": _pad_rows(labels, left, IGNORE)}


def collate_aligned(examples: list[Example], latent_id: int, pad_id: int) -> Batch:
    """Tensors for a batch; rows must share one latent count (pad it to the stage maximum)."""
    counts = {e.n_latents for e in examples}
    if len(counts) != 1:
        raise ValueError(f"latent counts {sorted(counts)} differ in one batch; use pad_latent_to_max")
    first = [e.input_ids.index(latent_id) if e.n_latents else 0 for e in examples]
    parts = _aligned([e.input_ids for e in examples], [e.labels for e in examples], first, pad_id)
    parts.update(n_latents=examples[0].n_latents, first_latent=max(first))
    if examples[0].teacher_ids:
        teacher = _aligned([e.teacher_ids for e in examples], [e.teacher_labels for e in examples],
                           [0] * len(examples), pad_id)
        parts.update({f"teacher_{k}": v for k, v in teacher.items()})
        shift = max(first)
        parts["distill_index"] = torch.tensor([e.distill_index + shift - f for e, f in zip(examples, first)])
        parts["teacher_distill_index"] = torch.tensor([e.teacher_distill_index for e in examples])
    if examples[0].step_targets:
        parts.update(collate_step_targets([e.step_targets for e in examples], pad_id))
    return Batch(**parts)


def collate_step_targets(targets: list[list[list[int]]], pad_id: int) -> dict:
    """``step_ids`` [B, S, L] (pad-filled) and ``step_lengths`` [B, S] (0 = masked slot)."""
    width = max(1, max(len(t) for row in targets for t in row))
    ids = [[t + [pad_id] * (width - len(t)) for t in row] for row in targets]
    return {"step_ids": torch.tensor(ids), "step_lengths": torch.tensor([[len(t) for t in row] for row in targets])}
