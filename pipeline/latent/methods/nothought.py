"""Coconut's "w/o thought" ablation (the reference's ``no_thoughts``): Coconut's curriculum, stage k
removes the first k steps from the text, but nothing takes their place: no latents, no markers.
It separates what the latents add from what the curriculum alone does.

    question remaining-steps answer EOS

From stage ``max_latent_stage + 1`` on no step is left (No-CoT's layout). Run it as a Coconut
chain is run (``method.name: nothought``, ``curriculum.start_stage: 1`` from CoT weights).
"""
from __future__ import annotations

from .base import Method, concat, register
from .coconut import Coconut, removed_steps


@register
class NoThought(Method):
    name = "nothought"
    has_curriculum = True

    stage_for_epoch = Coconut.stage_for_epoch     # the same curriculum as Coconut's

    def layout(self, p, special, cfg, stage, prefix_ids):
        tail = concat(p.steps[removed_steps(cfg, stage, len(p.steps)):]) + p.answer + [special["eos"]]
        return self.supervised(self.prompt(cfg, p.question, special, 0), tail)
