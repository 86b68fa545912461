"""Latent geometry, the collapse diagnostics of SIM-CoT (paper App. H):

* inter-latent distance: mean L2 distance over all pairs of one problem's latents z_1..z_K
  (collapsed latents sit on top of each other: GPT-2 Coconut 28.3 -> 4.2);
* distance to the vocabulary centre: mean L2 distance between each z_k and the mean input
  embedding row (collapsed latents drift away from the token manifold: 28 -> 39.4).

Both are averaged over problems. ``embedding_to_centre`` (the same distance for the embedding
rows themselves) gives the scale to read them against.
"""
from __future__ import annotations

import torch


def per_problem(latents: torch.Tensor, centre: torch.Tensor, latent_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """latents [B, K, H], centre [H], ``latent_mask`` [B, K] (which are each problem's latents; None:
    all) -> (inter-latent distance [B] (NaN with fewer than 2), distance to centre [B])."""
    latents = latents.float()
    real = (torch.ones(latents.shape[:2], device=latents.device) if latent_mask is None
            else latent_mask.to(latents.device).float())
    k = real.sum(dim=1)
    to_centre = ((latents - centre.float()).norm(dim=-1) * real).sum(dim=1) / k.clamp(min=1)
    pairwise = torch.cdist(latents, latents) * real[:, :, None] * real[:, None, :]   # [B, K, K], zero diagonal
    inter = pairwise.sum(dim=(1, 2)) / (k * (k - 1)).clamp(min=1)
    return torch.where(k >= 2, inter, torch.full_like(inter, float("nan"))), to_centre


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
    inter = [r["inter_latent_l2"] for r in rows if r["inter_latent_l2"] == r["inter_latent_l2"]]
    return {"inter_latent_l2": sum(inter) / len(inter) if inter else None,
            "to_vocab_centre_l2": sum(r["to_vocab_centre_l2"] for r in rows) / len(rows),
            "embedding_to_centre_l2": embedding_to_centre, "problems": len(rows)}
