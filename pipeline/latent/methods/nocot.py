"""No chain of thought: the question, then straight to the answer (the lower reference point)."""
from __future__ import annotations

from .base import Method, register


@register
class NoCoT(Method):
    name = "nocot"

    def layout(self, p, special, cfg, stage, prefix_ids):
        return self.supervised(self.prompt(cfg, p.question, special, 0), p.answer + [special["eos"]])
