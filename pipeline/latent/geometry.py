"""Latent geometry, the collapse diagnostics of SIM-CoT (paper App. H):

* inter-latent distance: mean L2 distance over all pairs of one problem's latents z_1..z_K
  (collapsed latents sit on top of each other: GPT-2 Coconut 28.3 -> 4.2);
* distance to the vocabulary centre: mean L2 distance between each z_k and the mean input
  embedding row (collapsed latents drift away from the token manifold: 28 -> 39.4).

Both are averaged over problems. ``embedding_to_centre`` (the same distance for the embedding
rows themselves) gives the scale to read them against. Beside them, the two figures training
logs and watches (pipeline/engine/guard.py): the mean pairwise cosine of a problem's latents
(1.0: every latent the same direction) and their mean norm over the token embeddings' mean norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _real(latents: torch.Tensor, latent_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, K] 1.0 where a column is one of its problem's latents (``latent_mask``; None: all)."""
    return (torch.ones(latents.shape[:2], device=latents.device) if latent_mask is None
            else latent_mask.to(latents.device).float())


def per_problem(latents: torch.Tensor, centre: torch.Tensor, latent_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """latents [B, K, H], centre [H], ``latent_mask`` [B, K] (which are each problem's latents; None:
    all) -> (inter-latent distance [B] (NaN with fewer than 2), distance to centre [B])."""
    latents = latents.float()
    real = _real(latents, latent_mask)
    k = real.sum(dim=1)
    to_centre = ((latents - centre.float()).norm(dim=-1) * real).sum(dim=1) / k.clamp(min=1)
    pairwise = torch.cdist(latents, latents) * real[:, :, None] * real[:, None, :]   # [B, K, K], zero diagonal
    inter = pairwise.sum(dim=(1, 2)) / (k * (k - 1)).clamp(min=1)
    return torch.where(k >= 2, inter, torch.full_like(inter, float("nan"))), to_centre


def pairwise_cosine(latents: torch.Tensor, latent_mask: torch.Tensor | None = None) -> torch.Tensor:
    """latents [B, K, H] -> the mean cosine over each row's pairs of latents [B] (NaN with fewer than 2)."""
    real = _real(latents, latent_mask)
    unit = F.normalize(latents.float(), dim=-1) * real[..., None]
    n = real.sum(dim=1)
    pairs = n * (n - 1)
    per_row = (unit @ unit.transpose(1, 2)).sum(dim=(1, 2)).sub(n).div(pairs.clamp(min=1))
    return torch.where(pairs > 0, per_row, torch.full_like(per_row, float("nan")))


def norm_ratio(latents: torch.Tensor, token_norm: torch.Tensor, latent_mask: torch.Tensor | None = None
               ) -> torch.Tensor:
    """latents [B, K, H], ``token_norm`` [B] (the mean norm of each problem's token embeddings) -> each
    row's mean latent norm over it [B]."""
    real = _real(latents, latent_mask)
    mean_norm = (latents.float().norm(dim=-1) * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
    return mean_norm / token_norm.float().clamp(min=1e-12)


def vocab_centre(embedding: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The mean embedding row, and the mean distance of the rows to it."""
    weight = embedding.detach().float()
    centre = weight.mean(dim=0)
    return centre, (weight - centre).norm(dim=-1).mean().item()


def summarise(rows: list[dict], embedding_to_centre: float) -> dict | None:
    """Means over the rows that carry distances (pairs need two latents: NaNs are left out);
    None when no row had latents."""
    rows = [r for r in rows if "to_vocab_centre_l2" in r]
    if not rows:
        return None
    def mean(key):
        values = [r[key] for r in rows if key in r and r[key] == r[key]]     # NaN != NaN
        return sum(values) / len(values) if values else None
    return {"inter_latent_l2": mean("inter_latent_l2"), "to_vocab_centre_l2": mean("to_vocab_centre_l2"),
            "latent_cosine": mean("latent_cosine"), "latent_norm_ratio": mean("latent_norm_ratio"),
            "embedding_to_centre_l2": embedding_to_centre, "problems": len(rows)}
