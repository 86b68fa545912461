"""Pure functions: a shard record + method + curriculum stage -> token ids, labels, step targets.

Rules (SIMCOT_SPEC.md §2.2, §3.2, §4.2, §4.4); every id comes from the manifest's
``special_tokens`` or the record, never from constants. ``answer_ids`` in a record carry no EOS:
layouts append ``eos``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

IGNORE = -100
METHODS = ("cot", "nocot", "coconut", "codi")


@dataclass(frozen=True)
class LayoutConfig:
    method: str
    c_thought: int = 2              # Coconut: latents per replaced step
    max_latent_stage: int = 3       # Coconut: stages with their own step; later ones are all-latent
    pad_latent_to_max: bool = True  # Coconut final stage: always max_latent_stage * c latents
    num_latent: int = 6             # CODI: latents fed to the model (SIM-CoT supervises num_latent + 1)
    include_last_step: bool = False  # CODI teacher keeps the last CoT step (reference: dropped)
    simcot: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")

    def n_latents(self, stage: int, n_steps: int) -> int:
        if self.method == "codi":
            return self.num_latent
        if self.method != "coconut" or stage == 0:
            return 0
        if stage <= self.max_latent_stage:
            return self.c_thought * stage
        groups = self.max_latent_stage if self.pad_latent_to_max else min(n_steps, self.max_latent_stage)
        return self.c_thought * groups


@dataclass
class Example:
    """One laid-out problem. ``step_targets``: one id list per decoder slot ([] = masked)."""
    input_ids: list[int]
    labels: list[int]
    n_latents: int = 0
    step_targets: list[list[int]] = field(default_factory=list)
    teacher_ids: list[int] = field(default_factory=list)
    teacher_labels: list[int] = field(default_factory=list)
    distill_index: int = -1          # CODI: column of the token before the first answer token (student)
    teacher_distill_index: int = -1  # same token in the teacher sequence


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


def layout(record: dict, special: dict[str, int], cfg: LayoutConfig, stage: int = 0,
           prefix_ids: list[int] | None = None) -> Example:
    q, steps, ans = list(record["question_ids"]), [list(s) for s in record["step_ids"]], list(record["answer_ids"])
    eos = special["eos"]
    if cfg.method == "cot":
        body = [t for s in steps for t in s] + ans + [eos]
        return Example(q + body, [IGNORE] * len(q) + body)
    if cfg.method == "nocot":
        return Example(q + ans + [eos], [IGNORE] * len(q) + ans + [eos])
    if cfg.method == "coconut":
        return _coconut(q, steps, ans, special, cfg, stage)
    if prefix_ids is None:
        raise ValueError("CODI layout needs prefix_ids (the tokenised answer prefix)")
    return _codi(q, steps, ans, special, cfg, answer_start(ans, prefix_ids))


def _coconut(q, steps, ans, special, cfg: LayoutConfig, stage: int) -> Example:
    n_latents = cfg.n_latents(stage, len(steps))
    skipped = stage if stage <= cfg.max_latent_stage else len(steps)
    tail = [t for s in steps[skipped:] for t in s] + ans + [special["eos"]]
    head = q + [special["start_latent"]] + [special["latent"]] * n_latents + [special["end_latent"]]
    example = Example(head + tail, [IGNORE] * len(head) + tail, n_latents)
    if cfg.simcot and n_latents:
        pseudo = [t for s in steps[skipped:] for t in s] + ans      # what follows <end>, without EOS
        example.step_targets = coconut_step_targets(steps[:skipped], n_latents // cfg.c_thought,
                                                    cfg.max_latent_stage, pseudo)
    return example


def coconut_step_targets(replaced: list[list[int]], groups: int, max_stage: int, pseudo: list[int]) -> list[list[int]]:
    """Targets of each thought group: group g reproduces replaced step g; steps from
    ``max_stage - 1`` on are merged into the last group; groups beyond the steps get the pseudo
    thought (the text after ``<end>``), as the reference does (§3.2)."""
    merged = replaced[:max_stage - 1]
    if len(replaced) >= max_stage:
        merged.append([t for s in replaced[max_stage - 1:] for t in s])
    targets = [list(s) for s in merged[:groups]]
    return targets + [list(pseudo)] * (groups - len(targets))


def slot_targets(steps: list[list[int]], n_slots: int) -> list[list[int]]:
    """CODI slots: the first n_slots-1 steps one each, the rest merged into the last slot,
    missing slots masked ([]) (§4.4)."""
    targets = [list(s) for s in steps[:n_slots - 1]]
    if len(steps) >= n_slots:
        targets.append([t for s in steps[n_slots - 1:] for t in s])
    return targets + [[] for _ in range(n_slots - len(targets))]


def _codi(q, steps, ans, special, cfg: LayoutConfig, start: int) -> Example:
    eos, n = special["eos"], cfg.num_latent
    teacher_steps = steps if cfg.include_last_step else steps[:-1]
    cot = [t for s in teacher_steps for t in s]
    teacher = q + cot + ans + [eos]
    head = q + [special["bot"]] + [special["latent"]] * n + [special["eot"]]
    example = Example(head + ans + [eos], [IGNORE] * len(head) + ans + [eos], n,
                      teacher_ids=teacher, teacher_labels=[IGNORE] * len(q) + cot + ans + [eos],
                      distill_index=len(head) + start - 1, teacher_distill_index=len(q) + len(cot) + start - 1)
    if cfg.simcot:
        example.step_targets = slot_targets(teacher_steps, n + 1)
    return example
