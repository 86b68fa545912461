"""Batched, left-padded, KV-cached latent inference (Coconut and CODI), greedy.

    from pipeline.inference.generate import latent_generate
    new_tokens = latent_generate(model, prompts, latent_id, eos_id, max_new_tokens=64)

Each prompt is a list of token ids that already holds its latent placeholders
(``question <start> <latent>xn <end>`` for Coconut, ``question <bot> <latent>xn <eot>`` for
CODI). Latents are filled exactly as in training (pipeline.latent.loop), then tokens are decoded
greedily from the cache; each row stops before its EOS. Prompts may hold different latent counts
(a Coconut model trained with ``pad_latent_to_max: false``). Batched output equals running each
prompt alone (tested).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from transformers import DynamicCache

from pipeline.latent.collate import align_rows, positions_from_mask
from pipeline.latent.loop import PassCache, fill_latents, latent_block
from pipeline.latent.reasoner import mask_classes
from pipeline.latent.reference_quirks import reference_attention as reference_attention_of


def left_pad_prompts(prompts: list[list[int]], pad_id: int):
    """Left-pad so every prompt ends in the last column (decoding starts there) -> (ids, mask).
    Prompts of one latent count then hold their latents in the same columns; prompts of different
    counts end theirs together (:func:`pipeline.latent.loop.latent_block`)."""
    ids, mask, _ = align_rows(prompts, [len(p) for p in prompts], pad_id)
    return ids, mask


@torch.no_grad()
def prefill(model, ids: torch.Tensor, mask: torch.Tensor, latent_id: int | None, project: Callable | None,
            jacobi_iterations: int | None = None, reference_attention: bool = False):
    """Run the prompt (filling the ``latent_id`` columns; None: one pass) -> (next-token logits
    [B, V], cache chunks, latents [B, n, H] or None, which of them are each row's latents [B, n] or
    None for all). ``reference_attention``: the CODI reference's
    (:func:`pipeline.latent.loop.reference_attention`)."""
    body, head = model.get_decoder(), model.get_output_embeddings()
    embeds = model.get_input_embeddings()(ids)
    first, n, latent_mask = latent_block(ids, latent_id) if latent_id is not None else (0, 0, None)
    if n == 0:
        cache = PassCache([], body.config.num_hidden_layers)
        hidden = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), cache=cache,
                      use_cache=True).last_hidden_state
        return head(hidden[:, -1]), [cache.new_chunk()], None, None
    reference = reference_attention_of(mask, first, embeds.dtype) if reference_attention else None
    passes = fill_latents(body, embeds, mask, positions_from_mask(mask), first, n, project=project,
                          jacobi_iterations=jacobi_iterations, reference=reference, latent_mask=latent_mask)
    return head(passes.hidden[:, -1]), passes.cache_chunks, passes.latents, latent_mask


def latent_generate(model, prompts: list[list[int]], latent_id: int | None, eos_id: int, max_new_tokens: int,
                    pad_id: int = 0, project: Callable | None = None, sync_ranks: bool = False,
                    jacobi_iterations: int | None = None, reference_attention: bool = False,
                    masked_classes: Sequence[int] = ()) -> list[list[int]]:
    """Greedy new tokens for each prompt (without the EOS). ``sync_ranks``: keep decoding until
    every rank is done, so data-parallel ranks make the same number of forward calls;
    ``jacobi_iterations``: fill the latents by Jacobi iteration (as the model was trained);
    ``reference_attention``: attend as the CODI reference does (left pads after the question pass);
    ``masked_classes``: tokens never generated (``Method.masked_classes(..., generating=True)``)."""
    return generate_with_latents(model, prompts, latent_id, eos_id, max_new_tokens, pad_id, project, sync_ranks,
                                 jacobi_iterations, reference_attention, masked_classes)[0]


@torch.no_grad()
def generate_with_latents(model, prompts: list[list[int]], latent_id: int | None, eos_id: int, max_new_tokens: int,
                          pad_id: int = 0, project: Callable | None = None, sync_ranks: bool = False,
                          jacobi_iterations: int | None = None, reference_attention: bool = False,
                          masked_classes: Sequence[int] = ()):
    """``latent_generate``, also returning the latents fed to the model ([B, K, H], None without) and
    which of them are each row's ([B, K]; None: all, every prompt holding K)."""
    device = model.get_input_embeddings().weight.device
    ids, mask = left_pad_prompts(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    logits, chunks, latents, latent_mask = prefill(model, ids, mask, latent_id, project, jacobi_iterations,
                                                   reference_attention)
    body = model.get_decoder()
    cache = DynamicCache()            # decoding appends one column per step: an ordinary cache
    for layer in range(body.config.num_hidden_layers):
        cache.update(torch.cat([c[layer][0] for c in chunks], dim=2), torch.cat([c[layer][1] for c in chunks], dim=2),
                     layer)
    if reference_attention:           # decoding attends every column, positions count columns
        position, mask = torch.full_like(mask[:, 0], mask.size(1) - 1), torch.ones_like(mask)
    else:
        position = positions_from_mask(mask).max(dim=1).values
    masked = torch.tensor(sorted(masked_classes), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        token = mask_classes(logits, masked).argmax(dim=-1)
        for row in (~done).nonzero().flatten().tolist():
            if token[row].item() == eos_id:
                done[row] = True
            else:
                out[row].append(token[row].item())
        if _all_done(done, sync_ranks):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        hidden = body(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], cache=cache,
                      use_cache=True).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, -1])
    return out, latents, latent_mask


def _all_done(done: torch.Tensor, sync_ranks: bool) -> bool:
    flag = torch.tensor([0 if bool(done.all()) else 1], device=done.device)
    if sync_ranks and dist.is_initialized():
        dist.all_reduce(flag)
    return int(flag.item()) == 0
