"""An attention kernel registered under a new name through transformers' ``AttentionInterface``: it
computes SDPA, as transformers calls it, and records the kind of pass that called it (the tests of
pipeline/latent/attention.py's dispatch).

    with registered() as calls:          # model.config._attn_implementation = NAME
        ...
    calls                                # [(pass kind, whether a mask came), ...] per call

``COUNTING`` counts its calls in a tensor (``COUNT``), which a compiled graph adds to without guarding
on it (the pass kind, or a list's length, would make it compile once per value).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipeline.latent.attention import current_pass

NAME, MASKLESS, COUNTING = "recording_sdpa", "recording_maskless", "counting_sdpa"
CALLS: list[tuple[str | None, bool]] = []
COUNT = torch.zeros((), dtype=torch.long)


def recording(module, query, key, value, attention_mask, **kwargs):
    CALLS.append((current_pass(), attention_mask is not None))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def counting(module, query, key, value, attention_mask, **kwargs):
    COUNT.add_(1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextmanager
def registered():
    """``NAME`` and ``COUNTING`` with SDPA's mask function; ``MASKLESS`` without one (transformers
    gives it no mask)."""
    for name, kernel, mask in ((NAME, recording, True), (MASKLESS, recording, False), (COUNTING, counting, True)):
        AttentionInterface.register(name, kernel)
        if mask:
            AttentionMaskInterface.register(name, sdpa_mask)
    try:
        yield CALLS
    finally:
        for name in (NAME, MASKLESS, COUNTING):
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)
        CALLS.clear()
        COUNT.zero_()
