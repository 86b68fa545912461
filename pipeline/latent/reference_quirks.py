"""Bugs of the released CODI + SIM-CoT code, emulated on request to reproduce its numbers
(``method.reference_quirks``; each is fixed by default). What each computes is here; the few
branches that apply it live where the real path runs, and are all listed:

* ``method.reference_attention``: the question pass's mask as the reference's transformers makes
  it for SDPA on CUDA, no mask on the later passes (the question's left pads attended), positions
  counted by column (:func:`reference_attention`). Built by ``LatentReasoner._answer_pass``
  (training) and ``generate.prefill`` (generation), applied by ``loop.fill_latents`` (its
  ``reference`` argument).
* ``method.reference_step_truncation``: every slot's step targets cut to row 0's width by its
  ``dedup_trailing_pads`` (:func:`row0_width`), applied in ``LatentReasoner.step_loss``.
* its step scan over the whole teacher sequence: the ``cfg.reference_quirks`` branch of
  ``pipeline.latent.methods.codi.decoder_steps``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class ReferenceAttention(NamedTuple):
    """The CODI reference's attention on a left-padded batch (``method.reference_attention``)."""
    positions: torch.Tensor   # [B, T] HF's default positions: the column index (left pads shift a row's)
    question: torch.Tensor    # [B, 1, F, F] the question pass's additive mask (:func:`pad_rows_attend_all`)
    later: torch.Tensor       # [B, T] every later pass's mask: all ones (they attend the question's pads)


def reference_attention(mask: torch.Tensor, first: int, dtype: torch.dtype) -> ReferenceAttention:
    """The masks and positions the CODI reference's calls get for a batch whose question pass runs
    columns ``[0, first)`` with padding ``mask`` [B, T]."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return ReferenceAttention(positions, pad_rows_attend_all(mask[:, :first], dtype), torch.ones_like(mask))


def pad_rows_attend_all(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] padding mask -> [B, 1, T, T] additive causal mask in which a query row that could
    attend nothing (a left pad's) attends every column with its real scores, as the reference's
    transformers (4.5x) makes it for SDPA on CUDA (``AttentionMaskConverter._unmask_unattended``),
    where its released numbers were made. Left to today's transformers such a row comes out as
    zeros (SDPA) or a uniform average (eager); either way the pads' keys and values from layer 1
    on differ, and the reference's later passes attend them. As an explicit 4-D mask it is the
    same on eager, SDPA, CPU and CUDA."""
    t = mask.size(1)
    allowed = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril() & mask.bool()[:, None, :]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def row0_width(lengths: torch.Tensor) -> torch.Tensor:
    """[B, S] step lengths -> [B, S] labels each row keeps under the CODI reference's
    ``dedup_trailing_pads`` bug (SPEC 8.6): in every slot, every row is cut to row 0's width, its
    step and terminator plus one pad (a single label where row 0 has no step); row 0 keeps its own."""
    row0 = lengths[:1]
    width = torch.where(row0 > 0, row0 + 2, 1).expand_as(lengths).clone()
    width[0] = lengths[0] + 1
    return width
