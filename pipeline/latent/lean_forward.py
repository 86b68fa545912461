"""A lean forward of a LLaMA-family decoder stack: the same weights and the same operators as
transformers' model, without the model-level work around the layers; optionally compiled.

    hidden, chunk, layers = lean_forward(body, embeds, mask, positions, chunks, want_layers, compiled)
    hidden, fed, next_latent = ColumnPasses(body, positions, mask, question_chunk, compiled, embeds)(latent)

Why: a latent pass runs one column per row through every layer, so at small or launch-bound
shapes the work transformers does around the layers (mask building, cache objects, output
classes, decorators, kwargs plumbing) is a third of its host time (benchmark P11). Here a forward
is the layers' arithmetic alone: RMSNorm, the projections (called as modules, so LoRA adapters and
ZeRO-3's hooks see their calls), rotary embedding, the configured attention kernel called as
transformers calls it, with the mask transformers makes for it (pipeline/latent/attention.py), the
MLP. The single-column passes of the latent loop (:class:`ColumnPasses`) and of greedy decoding
carry every layer's keys and values whole from pass to pass.

``compiled``: the stack under ``torch.compile`` (inductor) wherever gradients are taken: one graph
per kind of call (the latent loop's passes, ``COLUMNS_PER_GRAPH`` to a call and the rest one to a
call; whole sequences with or without earlier keys, with or without every layer's states), the
key and column counts dynamic, so curriculum stages and batches do not recompile (benchmark P12
counts). It reads the weights as plain tensors: plain PyTorch, ZeRO-1/2,
or ZeRO-3 under the ``gathered`` policy (the trainer refuses the others). Evaluation and no-grad
calls run the eager stack. Measured on CPU (P12); not yet on a GPU.

Families: LLaMA, Mistral and Qwen2 (their layers are this arithmetic; Qwen2's biases live in the
projections), with any attention kernel whose mask is a tensor or None (SDPA, eager, the flash
kernels, a registered one); :func:`check_lean_support` says why another cannot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.latent.attention import (
    attention_kernel,
    kernel_mask,
    kernel_name,
    mask_part,
    run_kernel,
    same_pass_in_recompute,
)
from pipeline.latent.stack_key import KEY_BUDGET, KeyBudget, StackKey

LEAN_FAMILIES = ("llama", "mistral", "qwen2")
BODY_FORWARDS = ("auto", "transformers", "lean", "compiled")


def check_lean_support(config) -> str | None:
    """-> why the lean forward cannot run this model (None: it can)."""
    if config.model_type not in LEAN_FAMILIES:
        return f"model_type {config.model_type!r} is not one of {LEAN_FAMILIES}"
    kernel = kernel_name(config)
    if kernel == "flex_attention" or kernel.startswith("paged"):
        return f"attention {kernel} (its mask is no tensor that a single latent column can take its part of)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act={config.hidden_act!r} (the lean forward computes SiLU)"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "a sliding attention window"
    return None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def attend(attn, kernel, q, k, v, past, cos, sin, mask, positions):
    """T columns' attention: q, k, v [B, T, *]; ``past`` (keys, values) [B, kv_heads, K, head_dim] or
    None; ``mask`` what transformers gives ``kernel`` for these columns (:func:`kernel_mask`);
    ``positions`` [B, T] -> (output [B, T, heads * head_dim], the keys and values of the K + T
    columns)."""
    b, t = q.shape[:2]
    q = rotate(q.view(b, t, -1, attn.head_dim).transpose(1, 2), cos, sin)
    keys = rotate(k.view(b, t, -1, attn.head_dim).transpose(1, 2), cos, sin)
    values = v.view(b, t, -1, attn.head_dim).transpose(1, 2)
    if past is not None:
        keys, values = torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)
    return run_kernel(kernel, attn, q, keys, values, mask, positions), keys, values


def lean_layer(layer, kernel, x, cos, sin, past, mask, positions):
    """One decoder layer: LlamaDecoderLayer's arithmetic -> (x, keys, values)."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    out, keys, values = attend(attn, kernel, attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), past, cos, sin, mask,
                               positions)
    x = x + attn.o_proj(out)
    h = layer.post_attention_layernorm(x)
    mlp = layer.mlp
    return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)), keys, values


def lean_stack(body, kernel, x, cos, sin, past: list | None, mask, positions, key: StackKey,
               want_layers: bool = False):
    """Every layer, then the final norm -> (hidden, every layer's keys and values over the past and
    these columns, the hidden states as transformers' ``output_hidden_states`` lists them or None).
    ``key`` (:class:`StackKey`) says which layers are checkpointed: read from it, not from the
    modules, so that a compiled stack guards on the key in place of the module guards it skips. A
    layer replayed in backward runs under its forward's pass kind (eager; a compiled graph replays
    inside its own backward)."""
    checkpointed = key.checkpointed
    recompute = {} if torch.compiler.is_compiling() else {"context_fn": same_pass_in_recompute}
    grown, states = [], [x]
    for i, layer in enumerate(body.layers):
        args = (layer, kernel, x, cos, sin, None if past is None else past[i], mask, positions)
        if checkpointed[i]:
            x, keys, values = checkpoint(lean_layer, *args, use_reentrant=False, **recompute)
        else:
            x, keys, values = lean_layer(*args)
        grown.append((keys, values))
        states.append(x)
    hidden = body.norm(x)
    return hidden, grown, torch.stack(states[:-1] + [hidden]) if want_layers else None


class CompiledStack:
    """``stack`` (:func:`lean_stack`, :func:`column_block`) under ``torch.compile``. The guards on
    every module attribute are skipped (they cost more than the layers' arithmetic at small
    shapes: benchmark P12); the parameters are still the graph's inputs, read from the modules at
    each call, and the :class:`StackKey` the stack is called with stands in for the module guards,
    within a budget of structures (:class:`KeyBudget`). Dynamo's own recompilations (a size it
    could not keep dynamic) fail past ``RECOMPILE_LIMIT`` per stack instead of running eager
    unnoticed: set for the process (a context around each call costs more than a pass)."""

    def __init__(self, stack, backend: str = "inductor"):
        self.budget = KeyBudget(stack.__name__)
        self.compiled = torch.compile(stack, backend=backend, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        dynamo.fail_on_recompile_limit_hit = True

    def __call__(self, *args):
        """The stack's own arguments, its :class:`StackKey` among them."""
        self.budget.admit(next(arg for arg in args if isinstance(arg, StackKey)))
        return self.compiled(*args)


RECOMPILE_LIMIT = 8 * KEY_BUDGET    # graphs per stack: each structure's kinds of call (past or none, mask
                                    # or none, every layer's states or not, the column counts)
_COMPILED: dict = {}      # function -> its CompiledStack, made on first use (torch.compile caches per code object)


def compile_stack(stack) -> CompiledStack:
    if stack not in _COMPILED:
        _COMPILED[stack] = CompiledStack(stack)
    return _COMPILED[stack]


COLUMNS_PER_GRAPH = 5   # compiled: single-column passes per graph call, fixed so that every latent count shares the
                        # graphs (a call's wrapper work outweighs a pass's arithmetic at small shapes: P12)


def feed_column(latent: torch.Tensor, is_latent: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """What a latent column is fed, row by row: ``latent`` [B, 1, H] where ``is_latent`` [B] says the
    column is one of the row's latents, else the row's ``token`` embedding [B, 1, H] (the reference's
    per-row filling of ragged rows)."""
    return torch.where(is_latent[:, None, None], latent, token)


def column_block(body, kernel, latent, cos, sin, past: list, mask, positions, key: StackKey, project, keep,
                 tokens):
    """``len(cos)`` single-column passes in a row, each fed the one before's last hidden state through
    ``project`` (CODI's ``prj``; None: as it is), or where ``keep`` [B, passes] is False the row's
    token embedding in ``tokens`` [B, passes, H] -> (each pass's last hidden state and each latent fed,
    [B, passes, H] each, the next latent [B, 1, H], every layer's keys and values so far). ``mask``:
    these passes' part of their run's mask (:func:`pipeline.latent.attention.mask_part`)."""
    hiddens, fed = [], []
    known = past[0][0].size(2)
    for i in range(cos.size(0)):
        fed.append(latent)
        hidden, past, _ = lean_stack(body, kernel, latent, cos[i], sin[i], past, mask_part(mask, i, 1, known + i + 1),
                                     positions[:, i:i + 1], key)
        hiddens.append(hidden)
        latent = hidden if project is None else project(hidden)
        if keep is not None:
            latent = feed_column(latent, keep[:, i], tokens[:, i:i + 1])
    return torch.cat(hiddens, dim=1), torch.cat(fed, dim=1), latent, past


def mark_dynamic(*marks) -> None:
    """Tell ``torch.compile`` which sizes vary between calls, so that one graph serves them all: each
    mark is (a tensor or None, its dims that vary: the batch, the keys' count that grows pass by pass
    and with the question's length, a whole sequence's length). The marks live on these very
    tensors: mark what is passed, not a tensor it is made from."""
    for tensor, dims in marks:
        for dim in dims if tensor is not None else ():
            if tensor.size(dim) > 1:        # a size of 1 stays specialised (broadcast)
                torch._dynamo.maybe_mark_dynamic(tensor, dim)


def past_marks(past: list | None) -> list:
    return [(t, (0, 2)) for kv in past or [] for t in kv]


def mask_marks(mask: torch.Tensor | None, query_varies: bool = True) -> list:
    """A kernel's mask: its batch and key counts vary (and its query columns, ``query_varies``)."""
    if mask is None:
        return []
    return [(mask, (0, 1) if mask.dim() == 2 else (0, 2, 3) if query_varies else (0, 3))]


class ColumnRun:
    """A run of single-column passes after the keys and values in ``past`` (a list of (keys, values)
    per layer): the rotary tables of their ``positions`` [B, n] computed once, the kernel's mask made
    once for the run (``padding``: the 2-D mask over the ``past`` keys and the n columns, or None),
    every layer's keys and values carried whole from pass to pass. Greedy decoding feeds it a
    token per pass (:meth:`step`); the latent loop its latents (:class:`ColumnPasses`)."""

    def __init__(self, body, positions: torch.Tensor, padding: torch.Tensor | None, past: list, like: torch.Tensor,
                 project=None, compiled: bool = False) -> None:
        # every input the same layout whatever the pass or the batch: a compiled graph guards on strides
        self.body, self.project, self.past = body, project, [(k.contiguous(), v.contiguous()) for k, v in past]
        self.kernel, self.positions = attention_kernel(body.layers[0].self_attn), positions
        cos, sin = body.rotary_emb(like, position_ids=positions)         # ``like``: their dtype and device
        self.cos, self.sin = (t.transpose(0, 1)[:, :, None, None].contiguous() for t in (cos, sin))  # [n, B, 1, 1, d]
        known = self.past[0][0].size(2)
        self.mask = kernel_mask(body.config, None if padding is None else padding[:, :known + positions.size(1)],
                                positions.size(1), known, like)
        self.done = 0
        self.key = StackKey.of(body, project, compiled)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """The next pass, fed ``x`` [B, 1, H] -> its last hidden state [B, 1, H] (eager)."""
        i, keys = self.done, self.past[0][0].size(2)
        hidden, self.past, _ = lean_stack(self.body, self.kernel, x, self.cos[i], self.sin[i], self.past,
                                          mask_part(self.mask, i, 1, keys + 1), self.positions[:, i:i + 1],
                                          self.key)
        self.done += 1
        return hidden


class ColumnPasses(ColumnRun):
    """The single-column passes of one latent loop (a :class:`ColumnRun`): the latent projection and
    the per-row feeding inside the same graph when compiled, ``COLUMNS_PER_GRAPH`` passes per graph
    call (the rest one by one).

        passes = ColumnPasses(body, positions[:, first:first + n - 1], mask, question_chunk, compiled, embeds, prj,
                              keep=latent_mask[:, 1:], tokens=embeds[:, first + 1:first + n])
        hidden, fed, next_latent = passes(first_latent)     # columns first .. first + n - 2
        passes.past                                         # [(keys, values)] per layer: every column run
    """

    def __init__(self, body, positions: torch.Tensor, mask: torch.Tensor | None, past: list, compiled: bool,
                 like: torch.Tensor, project=None, keep: torch.Tensor | None = None, tokens: torch.Tensor | None = None
                 ) -> None:
        self.compiled = compiled and torch.is_grad_enabled()       # a graph pays for itself where there is a backward
        super().__init__(body, positions, mask, past, like, project, self.compiled)
        self.keep, self.tokens = keep, tokens
        self.stack = compile_stack(column_block) if self.compiled else column_block
        self.per_call = COLUMNS_PER_GRAPH if self.compiled else positions.size(1)    # eager: no graph to size

    def __call__(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run every pass, the first fed ``latent`` [B, 1, H] -> (each pass's last hidden state, each
        latent fed, [B, passes, H] each; the latent the last pass makes, [B, 1, H])."""
        hiddens, fed, total = [], [], self.cos.size(0)
        while self.done < total:
            count = self.per_call if total - self.done >= self.per_call else 1
            hidden, latents, latent = self._run(latent, self.done, count)
            hiddens.append(hidden)
            fed.append(latents)
            self.done += count
        return torch.cat(hiddens, dim=1), torch.cat(fed, dim=1), latent

    def _run(self, latent, start: int, count: int):
        end = start + count
        keys = self.past[0][0].size(2)
        mask = mask_part(self.mask, start, count, keys + count)
        mask = None if mask is None else mask.contiguous()     # a view's strides follow the whole run's mask
        keep = None if self.keep is None else self.keep[:, start:end].contiguous()
        tokens = None if self.keep is None else self.tokens[:, start:end].contiguous()
        positions = self.positions[:, start:end].contiguous()
        inputs = (latent.contiguous(), self.cos[start:end], self.sin[start:end], self.past, mask, positions)
        if self.compiled:
            mark_dynamic((inputs[0], (0,)), (inputs[1], (1,)), (inputs[2], (1,)), *mask_marks(mask, False),
                         (positions, (0,)), (keep, (0,)), (tokens, (0,)), *past_marks(self.past))
        hidden, latents, latent, self.past = self.stack(self.body, self.kernel, *inputs, self.key, self.project,
                                                        keep, tokens)
        return hidden, latents, latent


def joined_chunks(chunks: list) -> list | None:
    """Earlier passes' key/value chunks (each a (keys, values) per layer) as one (keys, values) per
    layer over all their columns; a single chunk as it is, None for none."""
    if len(chunks) <= 1:
        return chunks[0] if chunks else None
    return [(torch.cat([c[i][0] for c in chunks], dim=2), torch.cat([c[i][1] for c in chunks], dim=2))
            for i in range(len(chunks[0]))]


def lean_forward(body, embeds, mask, positions, chunks: list, want_layers: bool = False, compiled: bool = False):
    """One forward over some columns given earlier passes' key/value chunks, as
    ``pipeline.latent.loop.run_pass`` returns it: (last hidden, this pass's keys and values per
    layer, every layer's hidden states stacked or None). ``mask``: 2-D padding or 4-D, or None."""
    past = joined_chunks(chunks)
    known = 0 if past is None else past[0][0].size(2)
    cos, sin = body.rotary_emb(embeds, position_ids=positions)
    kernel_input = kernel_mask(body.config, mask, embeds.size(1), known, embeds)
    inputs = (embeds.contiguous(), cos.unsqueeze(1), sin.unsqueeze(1), past, kernel_input, positions.contiguous())
    stack = lean_stack
    if compiled and torch.is_grad_enabled():
        stack = compile_stack(lean_stack)
        x, cos, sin, _, kernel_input, positions = inputs
        mark_dynamic((x, (0, 1)), (cos, (0, 2)), (sin, (0, 2)), *mask_marks(kernel_input), (positions, (0, 1)),
                     *past_marks(past))
    kernel = attention_kernel(body.layers[0].self_attn)
    key = StackKey.of(body, compiled=stack is not lean_stack)
    hidden, grown, layers = stack(body, kernel, *inputs, key, want_layers)
    return hidden, [(k[:, :, known:], v[:, :, known:]) for k, v in grown], layers


def stack_for(body_forward: str, config) -> str:
    """The stack a decoder of ``config`` runs where the base runs ``body_forward``: the same, or
    transformers' model for a family the lean forward cannot run (a step decoder of another family,
    ``model.decoder_path``)."""
    return body_forward if check_lean_support(config) is None else "transformers"


def resolve_body_forward(requested: str, config) -> str:
    """``model.body_forward`` -> how training runs the decoder stacks: ``auto`` is ``lean`` where
    the model's family allows it (the same arithmetic, fewer host operations: benchmark P12), else
    ``transformers``. ``compiled`` is chosen explicitly: its first training step compiles (tens of
    seconds on a CPU), which pays off over a run at host-bound shapes (P12)."""
    if requested not in BODY_FORWARDS:
        raise ValueError(f"body_forward={requested!r}: one of {BODY_FORWARDS}")
    why_not = check_lean_support(config)
    if requested == "auto":
        return "transformers" if why_not else "lean"
    if requested != "transformers" and why_not:
        raise ValueError(f"body_forward={requested} cannot run this model: {why_not}")
    return requested
