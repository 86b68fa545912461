"""One evaluation set through a merged model: accuracy by both published metrics (and by a
paper's protocol where one is chosen), tokens, speed and the latents' geometry, split across ranks
without counting a problem twice; every problem's generated ids and text kept.

    result = evaluate_set(load_merged("runs/NAME/merged"), records, batch_size=64, max_new=64)
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from pipeline.inference.generate import generate_with_latents
from pipeline.inference.merged import MergedModel
from pipeline.inference.protocols import PROTOCOLS, Protocol
from pipeline.inference.scoring import hash_match, number_match
from pipeline.latent.geometry import norm_ratio, pairwise_cosine, per_problem, summarise, vocab_centre


def rank_slice(n: int) -> tuple[range, int]:
    """Contiguous, non-overlapping records per rank, and the padded count every rank iterates."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per = -(-n // world)
    return range(rank * per, min(n, (rank + 1) * per)), per


def evaluate_set(merged: MergedModel, records: list[dict], batch_size: int, max_new: int,
                 protocol: Protocol = PROTOCOLS["ours"]) -> dict:
    """Greedy answers for ``records`` (this rank's share), scored and summarised over every rank;
    ``protocol`` sets the new-token limit, the batch and one more answer rule where it has them."""
    batch_size, max_new = protocol.batch_size or batch_size, protocol.max_new_tokens or max_new
    sp, cfg, masked = merged.special, merged.cfg, merged.masked_classes()
    mine, per_rank = rank_slice(len(records))
    centre, embedding_to_centre = vocab_centre(merged.model.get_input_embeddings().weight)
    rows, start = [], time.perf_counter()
    for offset in range(0, per_rank, batch_size):
        chunk = [records[i] for i in mine[offset:offset + batch_size]]
        real = len(chunk)
        chunk = chunk or [records[0]]           # an idle rank still makes the same calls; not counted
        prompts = [merged.prompt(r) for r in chunk]
        outputs, latents, latent_mask = generate_with_latents(
            merged.model, prompts, merged.filled_latent_id(), sp["eos"], max_new,
            pad_id=sp["pad"], project=merged.projection, sync_ranks=True, jacobi_iterations=cfg.jacobi,
            reference_attention=cfg.reference_attention, masked_classes=masked, body_forward=merged.body_forward)
        geometry = _geometry(merged, prompts, latents, latent_mask, centre) if latents is not None else None
        for i, (record, prompt, new) in enumerate(list(zip(chunk, prompts, outputs))[:real]):
            rows.append(_scored(merged, record, prompt, new, protocol))
            if geometry is not None:
                rows[-1].update({key: float(values[i]) for key, values in geometry.items()})
    elapsed = time.perf_counter() - start
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (rows, elapsed))
        rows = [r for part, _ in gathered for r in part]
        elapsed = max(t for _, t in gathered)
    n = len(rows)
    protocol_accuracy = sum(r["protocol"] for r in rows) / max(1, n) if protocol.correct else None
    return {"n": n, "protocol": {"name": protocol.name, "rule": protocol.rule, "max_new_tokens": max_new,
                                 "batch_size": batch_size, "accuracy": protocol_accuracy},
            "accuracy_hash": sum(r["hash"] for r in rows) / max(1, n),
            "accuracy_number": sum(r["number"] for r in rows) / max(1, n),
            "mean_tokens": sum(r["latents"] + r["tokens"] for r in rows) / max(1, n),
            "seconds": elapsed, "problems_per_s": n / elapsed, "latency_s": elapsed / max(1, n),
            "latent_geometry": summarise(rows, embedding_to_centre), "examples": rows[:5], "predictions": rows}


def _geometry(merged: MergedModel, prompts: list[list[int]], latents, latent_mask, centre) -> dict:
    """Each problem's latent geometry: the distances of SIM-CoT App. H, and the cosine and norm ratio
    training watches (the norm ratio against the mean norm of the problem's own prompt embeddings)."""
    inter, to_centre = per_problem(latents, centre, latent_mask)
    table = merged.model.get_input_embeddings().weight
    token_norm = torch.stack([table[torch.tensor(p, device=table.device)].float().norm(dim=-1).mean() for p in prompts])
    return {"inter_latent_l2": inter, "to_vocab_centre_l2": to_centre,
            "latent_cosine": pairwise_cosine(latents, latent_mask),
            "latent_norm_ratio": norm_ratio(latents, token_norm.to(latents.device), latent_mask)}


def _scored(merged: MergedModel, record: dict, prompt: list[int], new: list[int], protocol: Protocol) -> dict:
    text = merged.tokenizer.decode(new, skip_special_tokens=True)
    row = {"id": record["id"], "gold": record["answer"], "output": text, "output_ids": new, "tokens": len(new),
           "latents": merged.n_latents(record), "hash": hash_match(text, record["answer"]),
           "number": number_match(text, record["answer"])}
    if protocol.correct:
        read = merged.tokenizer.decode(prompt + new, skip_special_tokens=True) if protocol.with_prompt else text
        row["protocol"] = protocol.correct(read, record["answer"])
    return row
