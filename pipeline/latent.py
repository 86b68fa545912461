"""The one latent loop shared by every method (Coconut, CODI): fill latent slots pass by pass.

Semantics (SIMCOT_SPEC.md §2.4, pinned by ``shared/fixtures/coconut_golden``): the batch is
aligned so latent ``i`` of every row sits in column ``first + i``. Pass 0 runs the columns before
the first latent; pass ``i`` runs the single column of latent ``i-1``; latent ``i`` receives the
last-layer (post-norm) hidden state of the column before it, through an optional projection
(CODI's ``prj``); a final pass runs everything after the last filled latent. The KV cache is
reused between passes and gradients flow through the whole chain.

Checkpointing: each pass is a pure function of (its input embeddings, the K/V chunks of earlier
passes) that returns its hidden states and its own new K/V chunk. Recomputing a pass in backward
therefore rebuilds its cache from saved chunks and never appends to a live cache twice, which is
what breaks HF's own switch (it silently drops the cache; DEEPSPEED_CPU.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

KV = list[tuple[torch.Tensor, torch.Tensor]]  # one (keys, values) per layer, for some columns


@dataclass
class LatentPasses:
    """Outputs of the loop. ``hidden`` is the last-layer hidden state of every column
    ``[0, T)`` (the pre-latent, latent and tail passes concatenated); ``latents[:, i]`` is the
    vector fed at latent ``i``; ``next_latent`` the one the last latent produced (never fed;
    CODI's SIM-CoT supervises it). ``layer_states`` holds every layer's hidden state at the
    columns asked for with ``keep_layers_at`` (CODI distillation), else None."""
    hidden: torch.Tensor
    latents: torch.Tensor
    next_latent: torch.Tensor
    layer_states: torch.Tensor | None


def _cache_from(chunks: list[KV], n_layers: int) -> DynamicCache:
    cache = DynamicCache()
    if chunks:
        for layer in range(n_layers):
            keys = torch.cat([chunk[layer][0] for chunk in chunks], dim=2)
            values = torch.cat([chunk[layer][1] for chunk in chunks], dim=2)
            cache.update(keys, values, layer)
    return cache


def _run_pass(body, embeds, mask, positions, chunks: list[KV], want_layers: bool):
    """One forward over some columns given earlier chunks; returns (last hidden, new KV, layers)."""
    n_layers = len(body.layers)
    cache = _cache_from(chunks, n_layers)
    past = cache.get_seq_length()
    out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
               use_cache=True, output_hidden_states=want_layers)
    new = [(layer.keys[:, :, past:], layer.values[:, :, past:]) for layer in out.cache.layers]
    layers = torch.stack(out.hidden_states, dim=0) if want_layers else None
    return out.last_hidden_state, new, layers


def _flatten(kv: KV) -> list[torch.Tensor]:
    return [t for pair in kv for t in pair]


def _unflatten(flat: list[torch.Tensor]) -> KV:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def run_pass(body, embeds, mask, positions, chunks: list[KV], use_checkpoint: bool, want_layers: bool = False):
    if not use_checkpoint or not torch.is_grad_enabled():
        return _run_pass(body, embeds, mask, positions, chunks, want_layers)
    sizes = [len(c) * 2 for c in chunks]

    def pure(embeds, mask, positions, *flat):
        rebuilt, cursor = [], 0
        for size in sizes:
            rebuilt.append(_unflatten(list(flat[cursor:cursor + size])))
            cursor += size
        hidden, new, layers = _run_pass(body, embeds, mask, positions, rebuilt, want_layers)
        return (hidden, layers, *_flatten(new)) if want_layers else (hidden, *_flatten(new))

    flat_in = [t for c in chunks for t in _flatten(c)]
    outs = checkpoint(pure, embeds, mask, positions, *flat_in, use_reentrant=False)
    if want_layers:
        return outs[0], _unflatten(list(outs[2:])), outs[1]
    return outs[0], _unflatten(list(outs[1:])), None


def fill_latents(body, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 first: int, n_latents: int, project: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 use_checkpoint: bool = False, keep_layers_at: torch.Tensor | None = None) -> LatentPasses:
    """Run the latent loop over a batch whose latents occupy columns ``[first, first+n_latents)``.

    ``body`` is the decoder stack (``LlamaModel``: embeddings in, last hidden state out).
    The number of passes is ``n_latents + 1`` whatever the data, so every rank makes the same calls.
    ``keep_layers_at``: one tail column per row ([B]) whose every-layer hidden states are returned.
    """
    project = project or (lambda h: h)
    if n_latents == 0:
        raise ValueError("fill_latents needs at least one latent; run the model directly for none")
    chunks: list[KV] = []
    hidden, kv, _ = run_pass(body, embeds[:, :first], attention_mask[:, :first], position_ids[:, :first],
                             chunks, use_checkpoint)
    chunks.append(kv)
    pieces, latents = [hidden], []
    latent = project(hidden[:, -1:])
    for i in range(n_latents - 1):
        latents.append(latent)
        col = first + i
        hidden, kv, _ = run_pass(body, latent, attention_mask[:, :col + 1], position_ids[:, col:col + 1],
                                 chunks, use_checkpoint)
        chunks.append(kv)
        pieces.append(hidden)
        latent = project(hidden)
    latents.append(latent)
    last = first + n_latents - 1
    tail = torch.cat([latent, embeds[:, last + 1:]], dim=1)
    want_layers = keep_layers_at is not None
    hidden, _, layers = run_pass(body, tail, attention_mask, position_ids[:, last:], chunks, use_checkpoint,
                                 want_layers)
    pieces.append(hidden)
    rows = torch.arange(embeds.size(0), device=embeds.device)
    layer_states = layers[:, rows, keep_layers_at - last] if want_layers else None
    return LatentPasses(torch.cat(pieces, dim=1), torch.cat(latents, dim=1), project(hidden[:, :1]), layer_states)


def latent_columns(input_ids: torch.Tensor, latent_id: int) -> tuple[int, int]:
    """(first latent column, latent count); every row must hold them in the same columns."""
    is_latent = input_ids == latent_id
    counts = is_latent.sum(dim=1)
    n = int(counts[0])
    if n == 0:
        return 0, 0
    first = int(is_latent[0].nonzero()[0])
    expected = torch.zeros_like(is_latent)
    expected[:, first:first + n] = True
    if not torch.equal(is_latent, expected):
        raise ValueError("latents must sit in the same contiguous columns in every row; "
                         "collate with pipeline.collate.collate_aligned")
    return first, n


def coconut_forward(model, input_ids, attention_mask, position_ids, labels, latent_id):
    """Fidelity seam: Coconut's latent-filling forward for any HF causal LM -> (loss, logits).

    ``logits`` covers every column, as the reference returns it; ``loss`` is the mean next-token
    cross-entropy over labelled positions.
    """
    body, head = model.get_decoder(), model.get_output_embeddings()
    embeds = model.get_input_embeddings()(input_ids)
    first, n = latent_columns(input_ids, latent_id)
    if n == 0:
        hidden = body(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    else:
        hidden = fill_latents(body, embeds, attention_mask, position_ids, first, n).hidden
    logits = head(hidden)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
    return loss, logits
