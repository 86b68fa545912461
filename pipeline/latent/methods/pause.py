"""Pause tokens (Goyal et al., ICLR 2024), the ablation of latent reasoning: the CODI block of N
latent tokens, but each is the same learned ``<latent>`` embedding, never a fed-back hidden state.
One forward pass over the whole sequence: the extra positions add width, not sequential steps.

    question <bot> <latent> x N <eot> answer EOS

This module is the whole method: the registry gives every stage its layout, evaluation prompt,
and memory plan (``method.name: pause``, ``method.num_latent: N``).
"""
from __future__ import annotations

from .base import Method, SequenceShape, register
from .codi import CODI


@register
class Pause(Method):
    name = "pause"
    uses_latent_tokens = True

    def n_latents(self, cfg, stage, n_steps):
        return cfg.num_latent

    prompt = CODI.prompt        # the same block, so a pause run and a CODI run see the same ids

    def layout(self, p, special, cfg, stage, prefix_ids):
        n = cfg.num_latent
        return self.supervised(self.prompt(cfg, p.question, special, n), p.answer + [special["eos"]], n)

    def max_latents(self, cfg):
        return cfg.num_latent

    def base_tokens(self, cfg, seq: SequenceShape):
        return seq.question + cfg.num_latent + 2 + seq.answer + 1

    def labelled_tokens(self, cfg, seq: SequenceShape):
        return seq.answer + 1
