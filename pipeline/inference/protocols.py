"""Each paper's evaluation protocol: its answer rule, new-token limit and batching.

    python -m pipeline.evaluate --model M --set gsm8k=D --protocol codi

- ``ours``: greedy, ``--max-new-tokens``, ``--batch-size``; both answer rules reported.
- ``codi`` (CODI and SIM-CoT's ``CODI/test.py``): greedy, 256 new tokens, batched; correct when the
  last number of the answer (commas removed) equals the gold as a float.
- ``coconut`` (Coconut's ``run.py``): greedy, 64 new tokens, one problem at a time; correct when
  the text after the last ``#`` of the whole decoded sequence (the question included, commas
  removed, stripped) equals the gold as a string, so ``18.0`` is not ``18``.

The model's own latent layout (latent count, reference attention) comes from its
``latent_config.json``; an imported release carries the reference's.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.inference.scoring import hash_match, number_match


@dataclass(frozen=True)
class Protocol:
    name: str
    max_new_tokens: int | None          # None: --max-new-tokens
    batch_size: int | None              # None: --batch-size
    correct: Callable[[str, str], bool] | None   # (decoded text, gold) -> correct; None: ours (both rules)
    with_prompt: bool = False           # the rule reads the question's text too (Coconut decodes it all)
    rule: str = ""                      # its answer rule, for the report


PROTOCOLS = {
    "ours": Protocol("ours", None, None, None, rule="both: after the last '#' and the last number"),
    "codi": Protocol("codi", 256, None, number_match, rule="the last number, compared as a float"),
    "coconut": Protocol("coconut", 64, 1, hash_match, with_prompt=True,
                        rule="the text after the last '#' of question and answer, compared as a string"),
}
