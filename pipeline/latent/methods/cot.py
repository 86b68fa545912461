"""Explicit chain of thought: question, then every step, the answer and EOS, all labelled."""
from __future__ import annotations

from .base import Method, concat, register


@register
class CoT(Method):
    name = "cot"

    def layout(self, q, steps, ans, special, cfg, stage, prefix_ids):
        return self.supervised(self.prompt(cfg, q, special, 0), concat(steps) + ans + [special["eos"]])
