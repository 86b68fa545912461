"""``Batch``: one collated micro-batch, typed. Which parts are set depends on the method (CODI
adds the teacher's, SIM-CoT the step targets); ``LatentReasoner.forward`` asks the method which
it needs and refuses a batch without them, so a missing part never leaves a loss at zero.

A ``NamedTuple`` rather than a dataclass: DeepSpeed's ZeRO-3 module hooks look for the tensors in
a module's inputs inside tuples, lists and dicts only (an unknown type gets a warning that its
backward hooks may not fire)."""
from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor


class Batch(NamedTuple):
    input_ids: Tensor                       # [B, T], aligned so latent i sits in column first_latent + i
    attention_mask: Tensor                  # [B, T], 0 on pads
    position_ids: Tensor                    # [B, T], 0..len-1 over real tokens, 0 on pads
    labels: Tensor                          # [B, T], -100 where no loss
    n_latents: int = 0                      # latent columns the loop runs (rows may hold fewer: latent_counts)
    first_latent: int = 0
    teacher_input_ids: Tensor | None = None     # CODI: the explicit-CoT teacher sequence, and its parts
    teacher_attention_mask: Tensor | None = None
    teacher_position_ids: Tensor | None = None
    teacher_labels: Tensor | None = None
    distill_index: Tensor | None = None          # [B] student column distilled (CODI)
    teacher_distill_index: Tensor | None = None  # [B] the same token's column in the teacher
    step_ids: Tensor | None = None               # [B, S, L] SIM-CoT step targets per slot, pad-filled
    step_lengths: Tensor | None = None           # [B, S], 0 = masked slot
    latent_counts: Tensor | None = None          # [B] latents of each row when fewer than n_latents (None: all)
    label_index: Tensor | None = None            # [N] flat positions b * T + t whose next token is labelled
    teacher_label_index: Tensor | None = None    # the same for the teacher sequence

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(v.to(device) if torch.is_tensor(v) else v for v in self))

    def latent_mask(self) -> Tensor | None:
        """[B, n_latents]: True at each row's latents (left-aligned), None when every row has all."""
        if self.latent_counts is None:
            return None
        return torch.arange(self.n_latents, device=self.latent_counts.device) < self.latent_counts[:, None]

    def missing(self, parts: tuple[str, ...]) -> list[str]:
        """The named parts that are not set."""
        return [name for name in parts if getattr(self, name) is None]
