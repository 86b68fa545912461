"""What a method is: one object that owns everything the rest of the pipeline asks about it.

The layout of a training example, the evaluation prompt (built by the same ``prompt`` call the
layout uses, so evaluation cannot drift from training), the latent count per curriculum stage,
the decoder targets, the parts it needs (CODI's projection, a teacher pass) and the sequence
lengths the memory plan budgets. Nothing outside ``pipeline.latent.methods`` compares method names:
adding a method is one module here plus its recipe and tests (see ``pause.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from data_prep.tokenizer import LATENT_TOKENS

if TYPE_CHECKING:
    from .config import MethodConfig

IGNORE = -100
# The tokens data_prep adds to a tokenizer (pad only where it has none), by their manifest names.
ADDED_TOKENS = ("pad", *LATENT_TOKENS)
_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: one instance of each method, found by its ``name``."""
    _REGISTRY[cls.name] = cls()
    return cls


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"method {name!r}: expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


class Problem(NamedTuple):
    """One shard record's ids. ``joined_cot``: the CoT without its last step and the whole CoT, each
    joined by the step separator and tokenised as one string (CODI's teacher text); None for shards
    built before the field existed."""
    question: list[int]
    steps: list[list[int]]
    answer: list[int]               # without EOS: layouts append it
    joined_cot: tuple[list[int], list[int]] | None = None


@dataclass
class Example:
    """One laid-out problem. ``step_targets``: one id list per decoder slot ([] = masked); None for a
    layout without decoder targets."""
    input_ids: list[int]
    labels: list[int]
    n_latents: int = 0
    step_targets: list[list[int]] | None = None
    teacher_ids: list[int] = field(default_factory=list)
    teacher_labels: list[int] = field(default_factory=list)
    distill_index: int = -1          # CODI: column of the token before the first answer token (student)
    teacher_distill_index: int = -1  # same token in the teacher sequence


@dataclass(frozen=True)
class SequenceShape:
    """Token counts of one problem the activations are planned for (GSM8k-Aug with a LLaMA-3
    tokenizer, cut at about its 95th percentile; set them from your shards' length histogram)."""
    question: int = 96
    steps: int = 6
    step: int = 16
    answer: int = 8


class Method:
    """Defaults are a single-pass method without latents (explicit CoT's family)."""
    name = ""
    fills_latents = False       # latent slots are filled pass by pass by the latent loop
    uses_latent_tokens = False  # the latent special tokens' rows are trained (seeded only before that)
    supports_simcot = False     # has decoder slots a step decoder can supervise
    needs_projection = False    # CODI's ``prj`` between a hidden state and the next latent
    needs_teacher = False       # a teacher pass over the explicit CoT (CODI self-distillation)
    has_curriculum = False      # stages replace steps by latents (Coconut)
    seed_rows_from = None       # text whose token rows the latent tokens' rows start as (Coconut: "<<")
    decoder_first_position = 0  # position id of the step decoder's first input (the reference Coconut's: 1)
    decoder_dropout = True      # the step decoder trains in train mode (the reference Coconut's stays in eval)
    # The added tokens (ADDED_TOKENS) the method's reference gives rows in the base's LM head: the
    # others are never scored (their logits masked), so the base's softmax runs over the reference's
    # classes whatever rows the tokenizer added. None: every row is a class.
    vocabulary: tuple[str, ...] | None = None
    never_generated: tuple[str, ...] = ()   # classes of the vocabulary that generation never emits

    def masked_classes(self, special: dict[str, int], original_vocab: int, generating: bool = False) -> list[int]:
        """Ids of the added tokens outside the method's vocabulary (and, ``generating``, those it
        never emits): rows the base's LM head has and the reference's does not."""
        if self.vocabulary is None:
            return []
        keep = set(self.vocabulary) - (set(self.never_generated) if generating else set())
        return sorted({special[name] for name in ADDED_TOKENS
                       if name in special and special[name] >= original_vocab and name not in keep})

    # -------------------------------------------------------------- layout
    def n_latents(self, cfg: MethodConfig, stage: int, n_steps: int) -> int:
        return 0

    def stage_for_epoch(self, epoch: int, start_stage: int, epochs_per_stage: int) -> int:
        return 0

    def prompt_latents(self, cfg: MethodConfig, stage: int, n_steps: int) -> int:
        """Latents in an evaluation prompt for a problem of ``n_steps`` steps, at ``stage``."""
        return self.n_latents(cfg, stage, n_steps)

    def prompt(self, cfg: MethodConfig, question: list[int], special: dict[str, int], n_latents: int) -> list[int]:
        """The model's input before the text it generates: training layouts start with it."""
        return list(question)

    def layout(self, p: Problem, special: dict[str, int], cfg: MethodConfig, stage: int,
               prefix_ids: list[int] | None) -> Example:
        """One problem's ids laid out for training."""
        raise NotImplementedError

    def target_report(self, cfg: MethodConfig, special: dict[str, int], records: list[dict]) -> str | None:
        """One line on how the decoder targets come out of these records (printed at start-up), or
        None when there is nothing to say."""
        return None

    def supervised(self, head: list[int], tail: list[int], n_latents: int = 0) -> Example:
        """``head`` unlabelled, ``tail`` labelled."""
        return Example(head + tail, [IGNORE] * len(head) + tail, n_latents)

    # -------------------------------------------------------------- model
    def pass_kinds(self, cfg: MethodConfig) -> tuple[str, ...]:
        """The kinds of pass (``pipeline.latent.attention.PASS_KINDS``) that run the answer sequence:
        the latent loop's (Coconut's stage 0 runs whole sequences too), or one whole sequence."""
        if not self.fills_latents:
            return ("sequence",)
        return ("question", "jacobi" if cfg.jacobi else "latent", "tail") + (("sequence",) if self.has_curriculum
                                                                              else ())

    def slot_width(self, cfg: MethodConfig) -> int:
        """Latents per step-decoder slot (and per decoded step at evaluation)."""
        return 1

    def slot_vectors(self, cfg: MethodConfig, latents: torch.Tensor, next_latent: torch.Tensor) -> torch.Tensor:
        """[B, S, width, d]: the vectors each decoder slot reads."""
        b, n, d = latents.shape
        width = self.slot_width(cfg)
        return latents.reshape(b, n // width, width, d)

    def batch_parts(self, cfg: MethodConfig, n_latents: int) -> tuple[str, ...]:
        """Optional ``Batch`` parts ``LatentReasoner.forward`` needs for this method with
        ``n_latents`` latents (a missing one is an error, never a loss silently left at zero)."""
        keys = ()
        if self.needs_teacher:
            keys += ("teacher_input_ids", "teacher_attention_mask", "teacher_position_ids", "teacher_labels",
                     "distill_index", "teacher_distill_index")
        if cfg.simcot and n_latents:
            keys += ("step_ids", "step_lengths")
        return keys

    # -------------------------------------------------------------- memory plan
    def max_latents(self, cfg: MethodConfig) -> int:
        """Latents at the method's longest stage."""
        return 0

    def decoder_slots(self, cfg: MethodConfig) -> int:
        return 0

    def base_tokens(self, cfg: MethodConfig, seq: SequenceShape) -> int:
        """Tokens per problem through the base LM (student), at the longest stage."""
        return seq.question + seq.steps * seq.step + seq.answer + 1

    def teacher_tokens(self, cfg: MethodConfig, seq: SequenceShape) -> int:
        return 0

    def labelled_tokens(self, cfg: MethodConfig, seq: SequenceShape) -> int:
        """Tokens per problem whose logits the base LM head computes (teacher included)."""
        return seq.answer + 1 + seq.steps * seq.step


def layout(record: dict, special: dict[str, int], cfg: MethodConfig, stage: int = 0,
           prefix_ids: list[int] | None = None) -> Example:
    """A shard record laid out for ``cfg.name`` at curriculum ``stage``. Every id comes from the
    manifest's ``special_tokens`` or the record, never from constants; ``answer_ids`` in a record
    carry no EOS: layouts append ``eos``."""
    return get_method(cfg.name).layout(problem_of(record), special, cfg, stage, prefix_ids)


def problem_of(record: dict) -> Problem:
    """A shard record's ids as a ``Problem``."""
    joined = record.get("teacher_cot_ids"), record.get("cot_ids")
    return Problem(list(record["question_ids"]), [list(s) for s in record["step_ids"]], list(record["answer_ids"]),
                   None if joined[0] is None else (list(joined[0]), list(joined[1])))


def concat(steps: list[list[int]]) -> list[int]:
    return [t for s in steps for t in s]
