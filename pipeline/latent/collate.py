"""Batch examples so the first latent sits in the same column in every row (KV reuse, one
latent loop for the whole batch), then right-pad; position ids 0 on pads, 0..len-1 on tokens.

Rows may hold fewer latents than the batch runs (Coconut's ``pad_latent_to_max: false`` and
``uniform_prob``): ``latent_counts`` then says how many each has, and the loop feeds the other
columns their tokens (pipeline/latent/loop.py). As the reference collator does, a row without
latents is not shifted."""
from __future__ import annotations

import torch

from pipeline.latent.batch import Batch
from pipeline.latent.methods import IGNORE, Example


def _pad_rows(rows: list[list[int]], left: list[int], fill: int, min_width: int = 0) -> torch.Tensor:
    width = max([min_width] + [pad + len(r) for pad, r in zip(left, rows)])
    return torch.tensor([[fill] * pad + r + [fill] * (width - pad - len(r)) for pad, r in zip(left, rows)])


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0..len-1 over each row's real tokens, 0 on pads."""
    return ((mask.cumsum(1) - 1) * mask).long()


def align_rows(rows: list[list[int]], anchors: list[int], pad_id: int, min_width: int = 0) -> tuple[torch.Tensor, ...]:
    """Left-pad so every row's anchor index lands in one column, right-pad to the widest row (at
    least ``min_width`` columns); -> (ids, attention mask, position ids)."""
    left = [max(anchors) - a for a in anchors]
    mask = _pad_rows([[1] * len(r) for r in rows], left, 0, min_width)
    return _pad_rows(rows, left, pad_id, min_width), mask, positions_from_mask(mask)


def _aligned(ids: list[list[int]], labels: list[list[int]], first: list[int], pad_id: int,
             min_width: int = 0) -> dict:
    input_ids, mask, positions = align_rows(ids, first, pad_id, min_width)
    left = [max(first) - f for f in first]
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
            "labels": _pad_rows(labels, left, IGNORE, min_width)}


def label_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions ``b * T + t`` whose next token ``labels[b, t + 1]`` is a label: found here, on
    the host, so the loss selects them on a GPU without waiting for it."""
    rows, cols = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    return rows * labels.size(1) + cols


def collate_aligned(examples: list[Example], latent_id: int, pad_id: int, latent_span: int | None = None) -> Batch:
    """Tensors for a batch. ``latent_span``: the latent columns the batch runs (the stage's maximum,
    the same on every rank: ZeRO-3 lockstep), at least every row's count; None: every row must
    hold the same count."""
    counts = [e.n_latents for e in examples]
    span = max(counts) if latent_span is None else latent_span
    if latent_span is None and len(set(counts)) != 1:
        raise ValueError(f"latent counts {sorted(set(counts))} differ in one batch; give latent_span "
                         "(the stage's maximum) or use pad_latent_to_max")
    if max(counts) > span:
        raise ValueError(f"an example holds {max(counts)} latents, more than the batch's latent_span {span}")
    anchors = [e.input_ids.index(latent_id) for e in examples if e.n_latents]
    first = max(anchors, default=1 if span else 0)    # no row holds one: any column after the first runs them
    rows = [e.input_ids.index(latent_id) if e.n_latents else first for e in examples]
    # at least first + span columns: the latent columns every row runs must exist
    parts = _aligned([e.input_ids for e in examples], [e.labels for e in examples], rows, pad_id, first + span)
    ragged = any(c != span for c in counts)
    parts.update(n_latents=span, first_latent=first, label_index=label_index(parts["labels"]),
                 latent_counts=torch.tensor(counts) if ragged and span else None)
    if examples[0].teacher_ids:
        teacher = _aligned([e.teacher_ids for e in examples], [e.teacher_labels for e in examples],
                           [0] * len(examples), pad_id)
        parts.update({f"teacher_{k}": v for k, v in teacher.items()})
        parts["teacher_label_index"] = label_index(teacher["labels"])
        parts["distill_index"] = torch.tensor([e.distill_index + first - f for e, f in zip(examples, rows)])
        parts["teacher_distill_index"] = torch.tensor([e.teacher_distill_index for e in examples])
    if examples[0].step_targets is not None:
        parts.update(collate_step_targets([e.step_targets for e in examples], pad_id))
    return Batch(**parts)


def collate_step_targets(targets: list[list[list[int]]], pad_id: int) -> dict:
    """``step_ids`` [B, S, L] (pad-filled) and ``step_lengths`` [B, S] (0 = masked slot); rows with
    fewer slots (fewer latents) are padded with masked ones."""
    slots = max(len(row) for row in targets)
    targets = [row + [[]] * (slots - len(row)) for row in targets]
    width = max([1] + [len(t) for row in targets for t in row])
    ids = [[t + [pad_id] * (width - len(t)) for t in row] for row in targets]
    return {"step_ids": torch.tensor(ids, dtype=torch.long).reshape(len(targets), slots, width),
            "step_lengths": torch.tensor([[len(t) for t in row] for row in targets], dtype=torch.long
                                         ).reshape(len(targets), slots)}
