"""The tokenizer of an imported release: the base's own, with the reference's added tokens at the
reference's ids, then the project's other latent tokens (their rows never scored).

    tok, original = release_tokenizer(load_pretrained("meta-llama/Llama-3.2-1B"), "codi", config.vocab_size)

CODI resizes the base by three rows: V its ``[PAD]`` (added where the tokenizer has none; where it
has one, row V is unused and our ``<|start-latent|>`` stands in it), V+1 ``<bot>``, V+2 ``<eot>``.
Coconut appends ``<|start-latent|>``, ``<|end-latent|>``, ``<|latent|>`` in that order, and pads
with EOS.
"""
from __future__ import annotations

from common.cli import UserError
from data_prep.tokenizer import LATENT_TOKENS, PAD_TOKEN

REFERENCE_ROWS = 3          # both references add three rows to the base's tables


def release_tokenizer(tok, fmt: str, base_vocab: int):
    """``tok`` (the base's, ``base_vocab`` rows in its config) with the added tokens laid out as
    the reference ``fmt`` has them -> (tok, V: the vocabulary before them)."""
    original = len(tok)
    if original != base_vocab:
        raise UserError(f"the base's tokenizer has {original} tokens but its config {base_vocab} rows; the reference "
                        f"puts its added tokens at row {base_vocab}, which this tokenizer cannot: give --base the "
                        "model the release was trained from")
    order = reference_order(tok, fmt)
    for name in order:
        if name == "pad":
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
        else:
            tok.add_special_tokens({"additional_special_tokens": [LATENT_TOKENS[name]]},
                                   replace_extra_special_tokens=False)
    if fmt == "coconut":
        tok.pad_token = tok.eos_token
    placed = [tok.convert_tokens_to_ids(PAD_TOKEN if n == "pad" else LATENT_TOKENS[n]) for n in order]
    if placed != list(range(original, original + len(order))):
        raise UserError(f"the tokenizer put the added tokens {order} at {placed}, not at {original}.. (one of them "
                        "is already in its vocabulary); give --base a tokenizer without them")
    return tok, original


def reference_order(tok, fmt: str) -> list[str]:
    """The added tokens in id order: the reference's first, then ours."""
    if fmt == "codi":
        first = ["pad" if tok.pad_token is None else "start_latent", "bot", "eot"]
    elif fmt == "coconut":
        first = ["start_latent", "end_latent", "latent"]
    else:
        raise UserError(f"--format {fmt}: expected codi or coconut")
    return first + [name for name in LATENT_TOKENS if name not in first]
