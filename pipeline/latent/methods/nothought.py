"""Coconut's "w/o thought" ablation (the reference's ``no_thoughts``): Coconut's curriculum, stage k
removes the first k steps from the text, but nothing takes their place: no latents, no markers.
It separates what the latents add from what the curriculum alone does.

    question remaining-steps answer EOS

From stage ``max_latent_stage + 1`` on no step is left (No-CoT's layout). Run it as a Coconut
chain is run (``method.name: nothought``, ``curriculum.start_stage: 1`` from CoT weights).
"""
from __future__ import annotations

from .base import Method, concat, register


@register
class NoThought(Method):
    name = "nothought"
    has_curriculum = True

    def stage_for_epoch(self, epoch, start_stage, epochs_per_stage):
        return start_stage + epoch // epochs_per_stage

    def layout(self, p, special, cfg, stage, prefix_ids):
        skipped = stage if stage <= cfg.max_latent_stage else len(p.steps)
        tail = concat(p.steps[skipped:]) + p.answer + [special["eos"]]
        return self.supervised(self.prompt(cfg, p.question, special, 0), tail)
