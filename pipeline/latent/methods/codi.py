"""CODI (the reference CODI/ code): a fixed block of latents, each the projected hidden state
of the one before, and a teacher pass over the explicit CoT distilled into the student.

    student: question <bot> <latent> x N <eot> answer EOS
    teacher: question steps[:-1] answer EOS

The teacher's CoT is the steps joined by the separator and tokenised as one string, as the
reference does (``method.teacher_cot: pieces``: the per-step ids). The SIM-CoT slot targets are
the reference's too (``method.step_targets: spans``): the ``<<``...``>>`` spans of the teacher's
CoT ids, found by the token-level rule of its ``get_steps`` (:func:`step_spans`), so a step after
the first opens with the merged `` <<`` of a byte-level BPE and no separator token is a label;
``pieces`` gives each step's own ids (``step + separator``) instead.

With ``remove_eos: false`` (the reference's option; its released scripts all remove it) EOS also
separates the parts, and the student learns to say the EOS after <eot> that its prompt then holds:

    student: question EOS <bot> <latent> x N <eot> EOS answer EOS
    teacher: question EOS steps[:-1] EOS answer EOS

With SIM-CoT the N fed latents and the one the last latent produces are N + 1 decoder slots:
one step each, the overflow merged into the last slot, missing slots masked.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .base import IGNORE, Example, Method, SequenceShape, concat, problem_of, register


@register
class CODI(Method):
    name = "codi"
    fills_latents = uses_latent_tokens = supports_simcot = True
    needs_projection = needs_teacher = True
    vocabulary = ("pad", "bot", "eot")   # the reference resizes the base by exactly these: V, V+1, V+2
    never_generated = ("eot",)           # its generation scores logits[:, :V+2]

    def n_latents(self, cfg, stage, n_steps):
        return cfg.num_latent

    def prompt(self, cfg, question, special, n_latents):
        sep = [] if cfg.remove_eos else [special["eos"]]
        return list(question) + sep + [special["bot"]] + [special["latent"]] * n_latents + [special["eot"]] + sep

    def layout(self, p, special, cfg, stage, prefix_ids):
        q, ans = p.question, p.answer
        if prefix_ids is None:
            raise ValueError("CODI layout needs prefix_ids (the tokenised answer prefix)")
        start, eos, n = answer_start(ans, prefix_ids), special["eos"], cfg.num_latent
        t = teacher(p, cfg, special)
        sep = [] if cfg.remove_eos else [eos]
        head = self.prompt(cfg, q, special, n)
        unlabelled = len(head) - len(sep)       # the EOS after <eot> is the student's first label
        example = Example(head + ans + [eos], [IGNORE] * unlabelled + sep + ans + [eos], n,
                          teacher_ids=t.ids, teacher_labels=[IGNORE] * len(t.question) + t.ids[len(t.question):],
                          distill_index=len(head) + start - 1,
                          teacher_distill_index=len(t.question) + len(t.cot) + start - 1)
        if cfg.simcot:
            example.step_targets = slot_targets(decoder_steps(cfg, special, t), n + 1)
        return example

    def target_report(self, cfg, special, records):
        """How many of the teacher's steps the span rule finds: a step whose brackets the tokenizer
        merges with other text has no span (the reference loses it too); never silently."""
        if not cfg.simcot or cfg.step_targets != "spans":
            return None
        steps = found = short = 0
        for record in records:
            t = teacher(problem_of(record), cfg, special)
            spans = len(decoder_steps(cfg, special, t))
            steps, found, short = steps + len(t.steps), found + min(spans, len(t.steps)), short + (spans < len(t.steps))
        line = (f"step targets: the <<..>> spans of the teacher's CoT ids (method.step_targets=spans), "
                f"{found} of {steps} steps found in {len(records)} train problems")
        return line + (f"; {short} problems have fewer spans than steps (brackets merged with other text by this "
                       "tokenizer, or under reference_quirks an EOS before the CoT: the reference loses those "
                       "steps too; method.step_targets=pieces keeps them)" if short else "")

    def slot_vectors(self, cfg, latents, next_latent):
        return torch.cat([latents, next_latent], dim=1).unsqueeze(2)

    def max_latents(self, cfg):
        return cfg.num_latent

    def decoder_slots(self, cfg):
        return cfg.num_latent + 1

    def base_tokens(self, cfg, seq: SequenceShape):
        return seq.question + cfg.num_latent + 2 + seq.answer + 1 + (0 if cfg.remove_eos else 2)

    def teacher_tokens(self, cfg, seq: SequenceShape):
        return seq.question + seq.steps * seq.step + seq.answer + 1 + (0 if cfg.remove_eos else 2)

    def labelled_tokens(self, cfg, seq: SequenceShape):
        return seq.answer + 1 + self.teacher_tokens(cfg, seq) - seq.question


def answer_start(answer_ids: list[int], prefix_ids: list[int]) -> int:
    """Index in ``answer_ids`` of the first token that holds answer text: the common prefix length
    with the tokenised answer prefix. GPT-2 merges the space into " 18" (index 4, after ":");
    LLaMA-3 keeps " " apart (index 5); derived from the tokenizer, never from a model name."""
    n = 0
    while n < min(len(answer_ids), len(prefix_ids)) and answer_ids[n] == prefix_ids[n]:
        n += 1
    if n == 0 or n >= len(answer_ids):
        raise ValueError("answer ids do not start with the answer prefix; rebuild shards with this template")
    return n


def teacher_cot(p, cfg, teacher_steps: list[list[int]]) -> list[int]:
    """The teacher's CoT ids: ``joined`` (the reference's ``" ".join(steps)`` tokenised once, so a
    byte-level BPE merges across steps and no separator trails the last one) or ``pieces`` (the
    per-step ids the step decoder's targets use)."""
    if cfg.teacher_cot == "pieces":
        return concat(teacher_steps)
    if p.joined_cot is None:
        raise ValueError("these shards have no teacher_cot_ids (built before the field existed): rebuild them "
                         "with python -m data_prep build, or set method.teacher_cot=pieces")
    return list(p.joined_cot[1] if cfg.include_last_step else p.joined_cot[0])


class Teacher(NamedTuple):
    """The teacher's sequence of one problem: ``question + cot + answer EOS``."""
    steps: list[list[int]]      # the CoT steps it reads (the last dropped unless include_last_step)
    question: list[int]         # the question (and its EOS with remove_eos: false)
    cot: list[int]              # the CoT ids (:func:`teacher_cot`; and an EOS with remove_eos: false)
    ids: list[int]              # the whole sequence


def teacher(p, cfg, special: dict[str, int]) -> Teacher:
    """Problem ``p``'s teacher sequence, as the layout and the start-up report read it."""
    steps = p.steps if cfg.include_last_step else p.steps[:-1]
    sep = [] if cfg.remove_eos else [special["eos"]]
    question, cot = p.question + sep, teacher_cot(p, cfg, steps) + sep
    return Teacher(steps, question, cot, question + cot + p.answer + [special["eos"]])


def decoder_steps(cfg, special: dict[str, int], t: Teacher) -> list[list[int]]:
    """The steps the decoder slots reproduce (before slot assignment): the spans of the teacher's CoT
    ids, or with ``reference_quirks`` of its whole sequence up to the first EOS or pad, as the
    reference scans ``ref_input_ids`` (so ``remove_eos: false``, which puts an EOS after the
    question, leaves no step: its step loss is 0); ``step_targets: pieces``: the per-step ids."""
    if cfg.step_targets == "pieces":
        return t.steps
    opens, close = step_markers(special)
    if cfg.reference_quirks:
        return step_spans(t.ids, opens, close, stops=(special["eos"], special["pad"]))
    return step_spans(t.cot, opens, close)


def step_markers(special: dict[str, int]) -> tuple[tuple[int, ...], int]:
    """(ids that open a step, the id that closes one), from the layout tokens
    (``ShardSet.layout_tokens``: the brackets that are one token of the tokenizer)."""
    opens = tuple(special[k] for k in ("step_open", "step_open_spaced") if k in special)
    if not opens or "step_close" not in special:
        raise ValueError("the tokenizer has no single token for '<<' or '>>', so the reference's step rule finds "
                         "no step: set method.step_targets=pieces")
    return opens, special["step_close"]


def step_spans(ids: list[int], opens: tuple[int, ...], close: int, stops: tuple[int, ...] = ()) -> list[list[int]]:
    """The CODI reference's ``get_steps`` at the token level: the ids are cut at the first stop id;
    a step runs from an opening id to the next closing id, both included; ids outside a step (the
    separators, text between steps) and an opening never closed are skipped."""
    cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
    ids, spans, i = ids[:cut], [], 0
    while i < len(ids):
        if ids[i] in opens and close in ids[i + 1:]:
            end = ids.index(close, i + 1)
            spans.append(ids[i:end + 1])
            i = end + 1
        else:
            i += 1
    return spans


def slot_targets(steps: list[list[int]], n_slots: int) -> list[list[int]]:
    """CODI slots: the first n_slots-1 steps one each, the rest merged into the last slot,
    missing slots masked ([]), as the reference does."""
    targets = [list(s) for s in steps[:n_slots - 1]]
    if len(steps) >= n_slots:
        targets.append(concat(steps[n_slots - 1:]))
    return targets + [[] for _ in range(n_slots - len(targets))]
