"""Explicit chain of thought: question, then every step, the answer and EOS, all labelled."""
from __future__ import annotations

from .base import Method, concat, register


@register
class CoT(Method):
    name = "cot"

    def layout(self, p, special, cfg, stage, prefix_ids):
        return self.supervised(self.prompt(cfg, p.question, special, 0), concat(p.steps) + p.answer + [special["eos"]])
