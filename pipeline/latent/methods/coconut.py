"""Coconut (the reference Coconut/ code): stage k replaces the first k steps by c latents each.

    question <start> <latent> x (c * k) <end> remaining steps answer EOS

From stage ``max_latent_stage + 1`` on every step is latent. With SIM-CoT each group of c
latents is a decoder slot that must reproduce the step it replaced.

``progressive_train`` (the SIM-CoT authors' variant for LLaMA, the reference's
``get_cot_with_explainable_latent_dataset``): ``c * max_latent_stage`` latents at every stage,
stage 0 included; stage k removes the first k steps from the text; the decoder slots reproduce
*all* the steps from the start (by the same grouping), whatever the stage.
"""
from __future__ import annotations

from .base import Method, SequenceShape, concat, register


@register
class Coconut(Method):
    name = "coconut"
    fills_latents = uses_latent_tokens = supports_simcot = has_curriculum = True
    seed_rows_from = "<<"
    # The reference's decoder reads positions 1..L and stays in eval mode (its wrapper's train()
    # toggles only the base): no dropout in it. Equal for RoPE models; GPT-2's positions are learned.
    decoder_first_position = 1
    decoder_dropout = False

    def n_latents(self, cfg, stage, n_steps):
        if cfg.progressive_train:
            return cfg.c_thought * cfg.max_latent_stage
        if stage == 0:
            return 0
        if stage <= cfg.max_latent_stage:
            return cfg.c_thought * stage
        return cfg.c_thought * _groups_after_last_stage(cfg, n_steps)

    def prompt_latents(self, cfg, stage, n_steps):
        # the reference's get_question_latent_dataset: without pad_latent_to_max the count is capped by
        # the problem's steps at every stage (training caps it only after the last stage)
        if cfg.progressive_train:
            return cfg.c_thought * cfg.max_latent_stage
        return cfg.c_thought * min(_groups_after_last_stage(cfg, n_steps), stage)

    def stage_for_epoch(self, epoch, start_stage, epochs_per_stage):
        return start_stage + epoch // epochs_per_stage

    def prompt(self, cfg, question, special, n_latents):
        return list(question) + [special["start_latent"]] + [special["latent"]] * n_latents + [special["end_latent"]]

    def layout(self, p, special, cfg, stage, prefix_ids):
        q, steps, ans = p.question, p.steps, p.answer
        n_latents = cfg.n_latents(stage, len(steps))
        skipped = removed_steps(cfg, stage, len(steps))
        example = self.supervised(self.prompt(cfg, q, special, n_latents),
                                  concat(steps[skipped:]) + ans + [special["eos"]], n_latents)
        if cfg.simcot:                                   # no latents: no slots
            pseudo = concat(steps[skipped:]) + ans      # what follows <end>, without EOS
            explained = steps if cfg.progressive_train else steps[:skipped]
            example.step_targets = step_targets(explained, n_latents // cfg.c_thought, cfg.max_latent_stage, pseudo)
        return example

    def slot_width(self, cfg):
        return cfg.c_thought

    def max_latents(self, cfg):
        return cfg.c_thought * cfg.max_latent_stage

    def decoder_slots(self, cfg):
        return cfg.max_latent_stage

    def base_tokens(self, cfg, seq: SequenceShape):
        return super().base_tokens(cfg, seq) + self.max_latents(cfg) + 2


def _groups_after_last_stage(cfg, n_steps: int) -> int:
    """Thought groups after the last stage: every stage's, or without ``pad_latent_to_max`` no more
    than the problem has steps."""
    return cfg.max_latent_stage if cfg.pad_latent_to_max else min(n_steps, cfg.max_latent_stage)


def removed_steps(cfg, stage: int, n_steps: int) -> int:
    """Steps the curriculum removes from the text at ``stage``: the first ``stage``, every one after
    the last stage."""
    return stage if stage <= cfg.max_latent_stage else n_steps


def step_targets(replaced: list[list[int]], groups: int, max_stage: int, pseudo: list[int]) -> list[list[int]]:
    """Targets of each thought group: group g reproduces replaced step g; steps from
    ``max_stage - 1`` on are merged into the last group; groups beyond the steps get the pseudo
    thought (the text after ``<end>``), as the reference does."""
    merged = replaced[:max_stage - 1]
    if len(replaced) >= max_stage:
        merged.append(concat(replaced[max_stage - 1:]))
    targets = [list(s) for s in merged[:groups]]
    return targets + [list(pseudo)] * (groups - len(targets))
