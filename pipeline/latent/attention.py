"""The attention kernel every pass calls: the one ``model.attn_implementation`` names, taken from
transformers' registry (``AttentionInterface``: sdpa, eager, flash_attention_2/4, or a kernel a
user registers), given the mask transformers makes for that kernel.

    kernel = attention_kernel(layer.self_attn)         # the configured kernel, from transformers' registry
    mask = kernel_mask(body.config, padding, columns=T, past=K, like=embeds)
    out = run_kernel(kernel, layer.self_attn, q, keys, values, mask, positions)   # [B, T, heads * head_dim]
    with pass_kind("teacher"): ...                      # which pass runs (the start-up report, tests)

The mask is what transformers' ``create_causal_mask`` gives the same kernel for the same call: a
4-D one for SDPA and eager, the 2-D padding mask (or None) for the flash kernels, None for a kernel
registered without a mask function; a 4-D mask the caller made (the CODI reference's question
mask) is given as it is, as transformers does. A run of single-column passes (the latent columns,
greedy decoding) makes its mask once and each pass takes its part (:func:`mask_part`).
"""
from __future__ import annotations

import contextlib
import importlib

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from common.cli import UserError

# What runs each kind of pass, by name (the start-up report and the tests read them).
PASS_KINDS = {
    "sequence": "a whole sequence without latents (CoT, no-CoT, pause; a prompt without latents)",
    "question": "the columns before the first latent",
    "latent": "one latent column, the keys and values before it carried",
    "jacobi": "every latent column at once (Jacobi updates)",
    "tail": "the columns after the last latent",
    "teacher": "CODI's teacher over the explicit CoT",
    "step_decoder": "the SIM-CoT step decoder (training and decoding latents)",
    "decoding": "one greedily generated token, every earlier column's keys and values carried",
}
_CURRENT = {"kind": None}


@contextlib.contextmanager
def pass_kind(kind: str | None):
    """Name the pass that runs inside (one of ``PASS_KINDS``); what a kernel reads from
    :func:`current_pass`."""
    if kind is not None and kind not in PASS_KINDS:
        raise ValueError(f"pass kind {kind!r}: one of {', '.join(PASS_KINDS)}")
    before, _CURRENT["kind"] = _CURRENT["kind"], kind
    try:
        yield
    finally:
        _CURRENT["kind"] = before


def current_pass() -> str | None:
    """The kind of pass running now (None outside the latent model's passes)."""
    return _CURRENT["kind"]


def same_pass_in_recompute():
    """``torch.utils.checkpoint``'s ``context_fn``: a layer replayed in backward runs under the pass
    kind it ran under in forward."""
    return contextlib.nullcontext(), pass_kind(current_pass())


def kernel_name(config) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def kernel_report(passes: dict[str, tuple[object, str]]) -> str:
    """One line for the start-up report: each kind of pass -> (the config whose kernel it calls, the
    decoder stack it runs), grouped by what runs."""
    groups: dict[str, list[str]] = {}
    for kind, (config, stack) in passes.items():
        groups.setdefault(f"{kernel_name(config)} ({stack} stack)", []).append(kind)
    return "; ".join(f"{', '.join(kinds)}: {what}" for what, kinds in groups.items())


def why_unregistered(name: str) -> str | None:
    """-> why ``name`` is no attention kernel transformers can call (None: it is one)."""
    if name == "eager" or name in ALL_ATTENTION_FUNCTIONS:
        return None
    known = ", ".join(["eager", *sorted(k for k in ALL_ATTENTION_FUNCTIONS if "|" not in k)])
    return (f"{name!r} is not a registered attention kernel (registered: {known}); register one with "
            "transformers.AttentionInterface.register(name, function) before the run starts")


def flash_kernels(on_cuda: bool) -> dict[str, bool]:
    """Which flash-attention kernels can run here: FlashAttention-4 (``flash-attn-4``, Hopper or
    newer), FlashAttention-3 (``flash-attn-3``, Hopper), FlashAttention-2 (``flash-attn``)."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_flash_attn_4_available

    hopper = on_cuda and torch.cuda.get_device_capability()[0] >= 9
    return {"flash_attention_4": hopper and is_flash_attn_4_available(),
            "flash_attention_3": hopper and is_flash_attn_3_available(),
            "flash_attention_2": on_cuda and is_flash_attn_2_available()}


def pick_attention(requested: str, on_cuda: bool, setting: str = "model.attn_implementation") -> str:
    """``auto`` is SDPA: on recent GPUs torch's SDPA already runs cuDNN's flash kernel, and
    FlashAttention-4's heavier host-side call made the latent methods, whose passes are many small
    calls, slower (benchmarks, P6). A flash kernel is an explicit choice; one that cannot run here,
    or a name no kernel is registered under, is refused with the fix (``setting`` names the knob)."""
    if requested == "auto":
        return "sdpa"
    available = flash_kernels(on_cuda)
    if requested in available and not available[requested]:
        raise UserError(f"{setting}={requested} cannot run here (needs CUDA and `pip install -r "
                        "requirements-gpu.txt`); use auto or sdpa")
    why = why_unregistered(requested)
    if why:
        raise UserError(f"{setting}={requested}: {why}")
    return requested


def attention_kernel(attn: torch.nn.Module):
    """The function transformers' attention module ``attn`` calls for its configured kernel (for
    ``eager``, its model family's own), the registry's very object."""
    family_eager = importlib.import_module(type(attn).__module__).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(kernel_name(attn.config), family_eager)


def run_kernel(kernel, attn, q, keys, values, mask, positions) -> torch.Tensor:
    """q [B, heads, T, d]; keys, values [B, kv_heads, K + T, d] -> [B, T, heads * d]: ``kernel``
    called with the arguments transformers' attention module ``attn`` gives it."""
    out, _ = kernel(attn, q, keys, values, mask, dropout=attn.attention_dropout if attn.training else 0.0,
                    scaling=attn.scaling, position_ids=positions)
    return out.reshape(q.size(0), q.size(2), -1)


def kernel_mask(config, padding: torch.Tensor | None, columns: int, past: int, like: torch.Tensor):
    """The mask transformers gives ``config``'s kernel for ``columns`` query columns after ``past``
    keys: ``padding`` is the 2-D padding mask over the ``past + columns`` keys (1: attend), a 4-D
    mask (given as it is) or None; ``like``: the batch's embeddings (batch size, dtype, device)."""
    if padding is not None and padding.dim() == 4:
        return padding
    make = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(kernel_name(config))
    if make is None:            # transformers gives a kernel registered without a mask function none
        return None
    return make(batch_size=like.size(0), q_length=columns, kv_length=past + columns, q_offset=past, kv_offset=0,
                mask_function=causal_mask_function, attention_mask=None if padding is None else padding.bool(),
                allow_is_causal_skip=True, dtype=like.dtype, config=config, use_vmap=False, device=like.device)


def mask_part(mask: torch.Tensor | None, first: int, count: int, keys: int) -> torch.Tensor | None:
    """The part of a mask made for a run of single-column passes (:func:`kernel_mask` with
    ``columns`` = the run) that passes ``first .. first + count - 1`` use, over the first ``keys``
    keys: rows and keys of a 4-D mask, keys of a 2-D padding mask."""
    if mask is None:
        return None
    if mask.dim() == 4:
        return mask[:, :, first:first + count, :keys]
    return mask[:, :keys]
