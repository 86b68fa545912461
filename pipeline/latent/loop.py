"""The one latent loop shared by every method (Coconut, CODI): fill latent slots pass by pass
(or all at once by Jacobi iteration, :func:`jacobi_latents`).

Semantics (the reference Coconut forward, pinned by the golden fixture test): the latents
occupy columns ``[first, first + n)``. Pass 0 runs the columns before the first latent; pass
``i`` runs the single column ``first + i - 1``; a latent receives the last-layer (post-norm)
hidden state of the column before it, through an optional projection (CODI's ``prj``); a final
pass runs everything after the last latent column. Keys and values are reused between passes and
gradients flow through the whole chain.

Rows with fewer latents (``latent_mask``: Coconut's ``pad_latent_to_max: false`` and
``uniform_prob``) are filled as the reference fills them: a column that is not one of a row's
latents is fed that row's token embedding, so each row computes exactly what it would alone. The
number of passes is set by the caller (training: the stage's maximum, the same on every rank),
never by the data.

Checkpointing: HF's switch drops the KV cache inside each checkpointed layer, because replaying a
layer in backward would append to a live cache a second time (silently wrong losses). Our
passes use a :class:`PassCache` instead: the past keys/values are fixed chunks and ``update``
returns ``past + new`` without storing it, so a replayed layer sees exactly what it saw in
forward. With it, per-layer activation checkpointing keeps the cache
(:func:`enable_cache_safe_checkpointing`). Past chunks are kept once, never re-concatenated per
pass into stored copies.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.latent.attention import pass_kind, same_pass_in_recompute
from pipeline.latent.lean_forward import ColumnPasses, feed_column, lean_forward

KV = list[tuple[torch.Tensor, torch.Tensor]]  # one (keys, values) per layer, for some columns


@dataclass
class LatentPasses:
    """Outputs of the loop. ``hidden`` is the last-layer hidden state of every column
    ``[0, T)`` (the pre-latent, latent and tail passes concatenated); ``latents[:, i]`` is the
    vector fed at column ``first + i`` (a row's token embedding where ``latent_mask`` says that
    column is not one of its latents); ``next_latent`` the one the last latent produced (never fed;
    CODI's SIM-CoT supervises it). ``layer_states`` holds every layer's hidden state at the
    columns asked for with ``keep_layers_at`` (CODI distillation), else None; ``cache_chunks``
    the keys/values of every pass (generation continues from them)."""
    hidden: torch.Tensor
    latents: torch.Tensor
    next_latent: torch.Tensor
    layer_states: torch.Tensor | None
    cache_chunks: list = None         # the keys/values of every pass (or of several as one), for decoding on
    latent_mask: torch.Tensor | None = None   # [B, n]: which of ``latents`` are latents (None: all)


class _FrozenPastLayer(DynamicLayer):
    """One layer's cache for one pass: past chunks fixed, the new keys/values recorded, not appended."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.past = past
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None
        if past:
            self.keys, self.values = past[0]            # what shape/device queries look at
            self.device, self.is_initialized = past[0][0].device, True

    def update(self, key_states, value_states, *args, **kwargs):
        self.new = (key_states, value_states)           # a replay overwrites: idempotent
        if not self.past:
            return key_states, value_states
        keys = torch.cat([k for k, _ in self.past] + [key_states], dim=-2)
        values = torch.cat([v for _, v in self.past] + [value_states], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return sum(k.shape[-2] for k, _ in self.past)


class PassCache(DynamicCache):
    """A replay-safe cache for one forward pass over some columns, given earlier passes' chunks."""

    def __init__(self, chunks: list[KV], n_layers: int):
        super().__init__()
        self.layers = [_FrozenPastLayer([chunk[layer] for chunk in chunks]) for layer in range(n_layers)]

    def new_chunk(self) -> KV:
        return [layer.new for layer in self.layers]


def enable_cache_safe_checkpointing(model) -> None:
    """Per-layer activation checkpointing (non-reentrant) that keeps the cache: safe because
    every cached forward in this package goes through a :class:`PassCache`. ``use_reentrant=True``
    is never used: it crashes ZeRO when a module runs more than once per step."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False,
                                                                           "context_fn": same_pass_in_recompute})
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True


def run_pass(body, embeds, mask, positions, chunks: list[KV], want_layers: bool = False,
             body_forward: str = "transformers", kind: str = "question"):
    """One forward over some columns given earlier chunks -> (last hidden, new chunk, layer states).
    ``body_forward``: transformers' model, or ``lean``/``compiled`` (pipeline/latent/lean_forward.py);
    ``kind``: which pass it is (``pipeline.latent.attention.PASS_KINDS``)."""
    if body_forward != "transformers":
        with pass_kind(kind):
            return lean_forward(body, embeds, mask, positions, chunks, want_layers, body_forward == "compiled")
    cache = PassCache(chunks, body.config.num_hidden_layers)
    with pass_kind(kind):
        out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True, output_hidden_states=want_layers)
    layers = torch.stack(out.hidden_states, dim=0) if want_layers else None
    return out.last_hidden_state, cache.new_chunk(), layers


def pass_count(n_latents: int, jacobi_iterations: int | None = None) -> int:
    """Forward passes of the body per batch: one without latents; ``n_latents + 1`` filling them one
    per pass (:func:`fill_latents`); ``jacobi_iterations + 2`` by Jacobi iteration (:func:`jacobi_latents`)."""
    if n_latents == 0:
        return 1
    return n_latents + 1 if jacobi_iterations is None else jacobi_iterations + 2


def fill_latents(body, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 first: int, n_latents: int, project: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 keep_layers_at: torch.Tensor | None = None, jacobi_iterations: int | None = None,
                 reference=None, latent_mask: torch.Tensor | None = None,
                 body_forward: str = "transformers") -> LatentPasses:
    """Run the latent loop over a batch whose latents occupy columns ``[first, first+n_latents)``.

    ``body`` is the decoder stack (``LlamaModel``: embeddings in, last hidden state out).
    The number of passes is ``n_latents + 1`` whatever the data, so every rank makes the same calls.
    ``keep_layers_at``: one tail column per row ([B]) whose every-layer hidden states are returned.
    ``jacobi_iterations``: fill all latents at once, that many times (:func:`jacobi_latents`); None:
    one latent per pass. ``reference``: the CODI reference's attention
    (:func:`pipeline.latent.reference_quirks.reference_attention`: its question mask and positions,
    and no mask after the question pass), else ``attention_mask`` and ``position_ids`` throughout.
    ``latent_mask`` [B, n_latents]: True where column ``first + i`` is one of row b's latents, each
    row's a contiguous run (None: every row, every column); the other columns keep their tokens.
    ``body_forward``: every pass's forward, transformers' model or ``pipeline.latent.lean_forward``'s
    (``lean``, ``compiled``: the single-column passes then carry every layer's keys and values whole).
    """
    projection, project = project, project or (lambda h: h)       # the lean forward runs ``projection`` in its stack
    if n_latents == 0:
        raise ValueError("fill_latents needs at least one latent; run the model directly for none")
    if jacobi_iterations is not None:
        if reference is not None:
            raise ValueError("the CODI reference's attention is not defined for Jacobi updates")
        return jacobi_latents(body, embeds, attention_mask, position_ids, first, n_latents, project,
                              keep_layers_at, jacobi_iterations, latent_mask, body_forward)
    question_mask, later_mask = attention_mask[:, :first], attention_mask
    if reference is not None:
        position_ids, question_mask, later_mask = reference
    feed = _feeder(embeds, first, latent_mask)
    hidden, kv, _ = run_pass(body, embeds[:, :first], question_mask, position_ids[:, :first], [],
                             body_forward=body_forward)
    latent = feed(0, project(hidden[:, -1:]))
    if body_forward == "transformers" or n_latents == 1:
        columns, latents, chunks = _latent_columns(body, feed, project, latent, first, n_latents, later_mask,
                                                   position_ids, [kv])
    else:           # the lean forward: all the single-column passes at once, ``projection`` inside them
        end = first + n_latents
        keep = None if latent_mask is None else latent_mask[:, 1:]
        passes = ColumnPasses(body, position_ids[:, first:end - 1], later_mask, kv, body_forward == "compiled", latent,
                              projection, keep, embeds[:, first + 1:end])
        with pass_kind("latent"):
            column_states, fed, latent = passes(latent)
        columns, latents, chunks = [column_states], [fed, latent], [passes.past]
    pieces, latent = [hidden, *columns], latents[-1]
    last = first + n_latents - 1
    tail = torch.cat([latent, embeds[:, last + 1:]], dim=1)
    want_layers = keep_layers_at is not None
    hidden, kv, layers = run_pass(body, tail, later_mask, position_ids[:, last:], chunks, want_layers, body_forward,
                                  kind="tail")
    chunks.append(kv)
    pieces.append(hidden)
    rows = torch.arange(embeds.size(0), device=embeds.device)
    layer_states = layers[:, rows, keep_layers_at - last] if want_layers else None
    return LatentPasses(torch.cat(pieces, dim=1), torch.cat(latents, dim=1), project(hidden[:, :1]), layer_states,
                        chunks, latent_mask)


def _latent_columns(body, feed, project, latent, first: int, n_latents: int, later_mask, position_ids,
                    chunks: list[KV]):
    """Passes 1 .. n-1 under transformers' model, one latent column each, from the first latent ->
    (their last hidden states, every latent fed, the chunks: one per pass)."""
    pieces, latents = [], []
    for i in range(n_latents - 1):
        latents.append(latent)
        col = first + i
        mask = None if later_mask is None else later_mask[:, :col + 1]
        hidden, kv, _ = run_pass(body, latent, mask, position_ids[:, col:col + 1], chunks, kind="latent")
        chunks.append(kv)
        pieces.append(hidden)
        latent = feed(i + 1, project(hidden))
    return pieces, latents + [latent], chunks


def _feeder(embeds: torch.Tensor, first: int, latent_mask: torch.Tensor | None):
    """``feed(i, latent)``: what column ``first + i`` is fed, ``latent`` [B, 1, H] where it is a row's
    latent, else the row's token embedding (the reference's per-row filling)."""
    if latent_mask is None:
        return lambda i, latent: latent
    return lambda i, latent: feed_column(latent, latent_mask[:, i], embeds[:, first + i:first + i + 1])


def jacobi_latents(body, embeds, attention_mask, position_ids, first: int, n_latents: int, project,
                   keep_layers_at: torch.Tensor | None, iterations: int,
                   latent_mask: torch.Tensor | None = None, body_forward: str = "transformers") -> LatentPasses:
    """Parallel (Jacobi) latent updates, as PCCoT: the slots start as their token embeddings (the
    latent token's), and each of ``iterations`` passes runs all slots at once (the question's keys
    and values reused), slot ``i`` then taking the last-layer state of column ``first + i - 1``:
    slot 0 the question's last, the others their left neighbour's from this pass. Slots ``< t``
    are exact after ``t`` passes, so ``iterations = n_latents`` gives the sequential latents and
    0 leaves the token embeddings (pause tokens). The final pass runs the filled slots and the
    tail. Passes: ``iterations + 2`` whatever the data (ZeRO-3 lockstep); gradients flow through
    every iteration. Columns ``latent_mask`` excludes keep their token embeddings throughout."""
    end = first + n_latents
    hidden, prefix, _ = run_pass(body, embeds[:, :first], attention_mask[:, :first], position_ids[:, :first], [],
                                 body_forward=body_forward)
    from_question = project(hidden[:, -1:])
    tokens = latents = embeds[:, first:end]
    for _ in range(iterations):
        slots, _, _ = run_pass(body, latents, attention_mask[:, :end], position_ids[:, first:end], [prefix],
                               body_forward=body_forward, kind="jacobi")
        latents = torch.cat([from_question, project(slots[:, :-1])], dim=1)
        if latent_mask is not None:
            latents = torch.where(latent_mask[..., None], latents, tokens)
    tail = torch.cat([latents, embeds[:, end:]], dim=1)
    want_layers = keep_layers_at is not None
    out, kv, layers = run_pass(body, tail, attention_mask, position_ids[:, first:], [prefix], want_layers,
                               body_forward, kind="tail")
    rows = torch.arange(embeds.size(0), device=embeds.device)
    layer_states = layers[:, rows, keep_layers_at - first] if want_layers else None
    return LatentPasses(torch.cat([hidden, out], dim=1), latents, project(out[:, n_latents - 1:n_latents]),
                        layer_states, [prefix, kv], latent_mask)


def latent_block(input_ids: torch.Tensor, latent_id: int) -> tuple[int, int, torch.Tensor | None]:
    """-> (first latent column, columns spanned, latent mask [B, n] or None when every row has a
    latent in every one of them). Each row's latents must be one contiguous run; rows may start or
    end theirs at different columns (prompts of different latent counts aligned at either end)."""
    is_latent = input_ids == latent_id
    columns = is_latent.any(dim=0).nonzero().flatten()
    if len(columns) == 0:
        return 0, 0, None
    first, last = int(columns[0]), int(columns[-1])
    mask = is_latent[:, first:last + 1]
    counts = mask.sum(dim=1)
    starts = torch.where(counts > 0, mask.int().argmax(dim=1), 0)
    offsets = torch.arange(mask.size(1), device=mask.device)
    contiguous = (offsets >= starts[:, None]) & (offsets < (starts + counts)[:, None])
    if not torch.equal(mask, contiguous):
        raise ValueError("each row's latents must be one contiguous run of columns; "
                         "collate with pipeline.latent.collate.collate_aligned")
    return first, last + 1 - first, None if bool(mask.all()) else mask
