"""Batched, left-padded, KV-cached latent inference (Coconut and CODI), greedy, on the training stack.

    from pipeline.inference.generate import latent_generate
    new_tokens = latent_generate(model, prompts, latent_id, eos_id, max_new_tokens=64)

Each prompt is a list of token ids that already holds its latent placeholders
(``question <start> <latent>xn <end>`` for Coconut, ``question <bot> <latent>xn <eot>`` for
CODI). Latents are filled exactly as in training (pipeline.latent.loop), then tokens are decoded
greedily from the cache; each row stops before its EOS. Prompts may hold different latent counts
(a Coconut model trained with ``pad_latent_to_max: false``). Batched output equals running each
prompt alone (tested).

Every pass runs the decoder stack training runs (``body_forward``: ``lean`` where the model's
family allows it, else transformers' model; pipeline/latent/lean_forward.py) and the attention
kernel the model is configured with, so a model is scored with the arithmetic it was trained
with. A decoding step copies its tokens to the host once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from transformers import DynamicCache

from pipeline.latent.attention import pass_kind
from pipeline.latent.collate import align_rows, positions_from_mask
from pipeline.latent.lean_forward import ColumnRun, joined_chunks, resolve_body_forward, stack_for
from pipeline.latent.loop import fill_latents, latent_block, run_pass
from pipeline.latent.reasoner import mask_classes
from pipeline.latent.reference_quirks import reference_attention as reference_attention_of


def left_pad_prompts(prompts: list[list[int]], pad_id: int):
    """Left-pad so every prompt ends in the last column (decoding starts there) -> (ids, mask).
    Prompts of one latent count then hold their latents in the same columns; prompts of different
    counts end theirs together (:func:`pipeline.latent.loop.latent_block`)."""
    ids, mask, _ = align_rows(prompts, [len(p) for p in prompts], pad_id)
    return ids, mask


def generation_stack(body_forward: str, config) -> str:
    """The stack generation runs for a model trained with ``body_forward``: the same one, eager
    (``compiled`` graphs pay for themselves only where there is a backward)."""
    stack = resolve_body_forward(body_forward, config)
    return "lean" if stack == "compiled" else stack


def decoder_stack(body_forward: str, config) -> str:
    """The stack the step decoder runs: the base's, or transformers' model for a decoder of another
    family (``lean_forward.stack_for``, as training runs it)."""
    return generation_stack(stack_for(body_forward, config), config)


def generation_passes(model, decoder, body_forward: str, kinds: tuple[str, ...]) -> dict[str, tuple]:
    """Each kind of pass generation runs (the prompt's ``kinds``: ``Method.pass_kinds``, then
    decoding, and the step decoder's) -> (the config whose attention kernel it calls, its stack):
    the start-up report (``pipeline.latent.attention.kernel_report``)."""
    base = (model.config, generation_stack(body_forward, model.config))
    passes = {kind: base for kind in (*kinds, "decoding")}
    if decoder is not None:
        passes["step_decoder"] = (decoder.config, decoder_stack(body_forward, decoder.config))
    return passes


@torch.no_grad()
def prefill(model, ids: torch.Tensor, mask: torch.Tensor, latent_id: int | None, project: Callable | None,
            jacobi_iterations: int | None = None, reference_attention: bool = False, body_forward: str = "auto"):
    """Run the prompt (filling the ``latent_id`` columns; None: one pass) -> (next-token logits
    [B, V], cache chunks, latents [B, n, H] or None, which of them are each row's latents [B, n] or
    None for all). ``reference_attention``: the CODI reference's
    (:func:`pipeline.latent.reference_quirks.reference_attention`); ``body_forward``: the stack
    training ran (:func:`generation_stack`)."""
    body, head = model.get_decoder(), model.get_output_embeddings()
    stack = generation_stack(body_forward, body.config)
    embeds = model.get_input_embeddings()(ids)
    first, n, latent_mask = latent_block(ids, latent_id) if latent_id is not None else (0, 0, None)
    if n == 0:
        hidden, chunk, _ = run_pass(body, embeds, mask, positions_from_mask(mask), [], body_forward=stack,
                                    kind="sequence")
        return head(hidden[:, -1]), [chunk], None, None
    reference = reference_attention_of(mask, first, embeds.dtype) if reference_attention else None
    passes = fill_latents(body, embeds, mask, positions_from_mask(mask), first, n, project=project,
                          jacobi_iterations=jacobi_iterations, reference=reference, latent_mask=latent_mask,
                          body_forward=stack)
    return head(passes.hidden[:, -1]), passes.cache_chunks, passes.latents, latent_mask


class Decoding:
    """Greedy decoding's forward, one column per row a step after the prompt's keys and values
    (``chunks``), by ``stack``: the lean stack's :class:`ColumnRun` (the kernel's mask made once for
    ``steps`` steps), or transformers' model on a ``DynamicCache``. ``mask``: the prompt's padding
    (None: none); ``position``: [B] the prompt's last position; ``kind``: which pass it is
    (``pipeline.latent.attention.PASS_KINDS``)."""

    def __init__(self, body, chunks: list, mask: torch.Tensor | None, position: torch.Tensor, steps: int,
                 stack: str, kind: str = "decoding"):
        self.body, self.stack, self.kind, self.done = body, stack, kind, 0
        past = joined_chunks(chunks)
        if mask is None:
            mask = torch.ones(past[0][0].shape[0], past[0][0].shape[2], dtype=torch.long, device=position.device)
        self.positions = position[:, None] + torch.arange(1, steps + 1, device=position.device)
        self.mask = torch.cat([mask, mask.new_ones(mask.size(0), steps)], dim=1)
        if stack == "transformers":
            self.cache = DynamicCache()
            for layer, (keys, values) in enumerate(past):
                self.cache.update(keys, values, layer)
        else:
            self.run = ColumnRun(body, self.positions, self.mask, past, like=past[0][0])

    @torch.no_grad()
    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Feed ``embeds`` [B, 1, H] -> the last hidden state [B, 1, H]."""
        with pass_kind(self.kind):
            if self.stack != "transformers":
                return self.run.step(embeds)
            self.done += 1
            known = self.mask.size(1) - self.positions.size(1) + self.done
            return self.body(inputs_embeds=embeds, attention_mask=self.mask[:, :known],
                             position_ids=self.positions[:, self.done - 1:self.done], cache=self.cache,
                             use_cache=True).last_hidden_state


def latent_generate(model, prompts: list[list[int]], latent_id: int | None, eos_id: int, max_new_tokens: int,
                    pad_id: int = 0, project: Callable | None = None, sync_ranks: bool = False,
                    jacobi_iterations: int | None = None, reference_attention: bool = False,
                    masked_classes: Sequence[int] = (), body_forward: str = "auto") -> list[list[int]]:
    """Greedy new tokens for each prompt (without the EOS). ``sync_ranks``: keep decoding until
    every rank is done, so data-parallel ranks make the same number of forward calls;
    ``jacobi_iterations``: fill the latents by Jacobi iteration (as the model was trained);
    ``reference_attention``: attend as the CODI reference does (left pads after the question pass);
    ``masked_classes``: tokens never generated (``Method.masked_classes(..., generating=True)``);
    ``body_forward``: the decoder stack the model was trained with (:func:`generation_stack`)."""
    return generate_with_latents(model, prompts, latent_id, eos_id, max_new_tokens, pad_id, project, sync_ranks,
                                 jacobi_iterations, reference_attention, masked_classes, body_forward)[0]


@torch.no_grad()
def generate_with_latents(model, prompts: list[list[int]], latent_id: int | None, eos_id: int, max_new_tokens: int,
                          pad_id: int = 0, project: Callable | None = None, sync_ranks: bool = False,
                          jacobi_iterations: int | None = None, reference_attention: bool = False,
                          masked_classes: Sequence[int] = (), body_forward: str = "auto"):
    """``latent_generate``, also returning the latents fed to the model ([B, K, H], None without) and
    which of them are each row's ([B, K]; None: all, every prompt holding K)."""
    device = model.get_input_embeddings().weight.device
    ids, mask = left_pad_prompts(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    logits, chunks, latents, latent_mask = prefill(model, ids, mask, latent_id, project, jacobi_iterations,
                                                   reference_attention, body_forward)
    if reference_attention:           # decoding attends every column, positions count columns
        position, mask = torch.full_like(mask[:, 0], mask.size(1) - 1), torch.ones_like(mask)
    else:
        position = positions_from_mask(mask).max(dim=1).values
    body, embed, head = model.get_decoder(), model.get_input_embeddings(), model.get_output_embeddings()
    decode = Decoding(body, chunks, mask, position, max_new_tokens, generation_stack(body_forward, body.config))
    masked = torch.tensor(sorted(masked_classes), dtype=torch.long, device=device)
    done, out = [False] * len(prompts), [[] for _ in prompts]
    for step in range(max_new_tokens):
        token = mask_classes(logits, masked).argmax(dim=-1)
        for row, value in enumerate(token.tolist()):        # the step's one copy to the host
            if not done[row]:
                done[row] = value == eos_id
                if not done[row]:
                    out[row].append(value)
        if step == max_new_tokens - 1 or _all_done(done, sync_ranks, device):
            break
        logits = head(decode.step(embed(token[:, None]))[:, -1])
    return out, latents, latent_mask


def _all_done(done: list[bool], sync_ranks: bool, device: torch.device) -> bool:
    if not (sync_ranks and dist.is_initialized()):
        return all(done)
    flag = torch.tensor([0 if all(done) else 1], device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0
