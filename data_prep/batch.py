"""One batch of a source's raw records -> what the build writes of it (``data_prep build``).

    batch = prepare_batch(records, spec, parser, tok, opts, schema)
    batch.table        # the kept records as Arrow, in input order, without their ids
    batch.rejects      # the parser's rejects; batch.left_out: rows left out after tokenising

Run in the build's process or in its worker processes (``data_prep.workers``): what comes back is
Arrow and a few counts, not Python objects per token, so handing it over costs little.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .sources import Parsed, RawRecord, RecordParser, SourceSpec
from .split_writer import SplitCounts
from .templates import tokenize_joined_cots, tokenize_problems

# The record's fields but ``id`` (``loader.FEATURES``; the build's process adds the ids), in the order
# ``tokenized`` gives their values; the Arrow table takes them by name.
COLUMNS = ("question", "steps", "answer", "question_ids", "step_ids", "answer_ids", "teacher_cot_ids", "cot_ids",
           "source", "flags")


class StrictRejectError(ValueError):
    """``--strict`` met a malformed record."""


@dataclass
class PreparedBatch:
    table: object                                   # pyarrow.Table of COLUMNS
    rejects: list[dict] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)
    counts: SplitCounts = field(default_factory=SplitCounts)


def record_tokens(question_ids: list[int], step_ids: list[list[int]], answer_ids: list[int]) -> int:
    """A record's explicit-CoT length, the one ``--max-length`` is compared with: question, steps,
    answer and the EOS the layouts append."""
    return len(question_ids) + sum(map(len, step_ids)) + len(answer_ids) + 1


def prepare_batch(records: list[RawRecord], spec: SourceSpec, parser: RecordParser, tok, opts,
                  schema) -> PreparedBatch:
    """Parse, check and tokenise ``records`` (``opts`` a ``BuildOptions``); ``schema`` the Arrow
    schema of COLUMNS."""
    rejects, accepted = [], []
    for parsed in map(parser, records):
        if parsed.reject:
            if opts.strict:
                raise _strict_stop(spec, parsed.line, parsed.reject)
            rejects.append({"source": spec.name, "line": parsed.line, "reason": parsed.reject})
        else:
            accepted.append(parsed)
    batch = tokenized(accepted, spec, tok, opts, schema)
    batch.rejects = rejects
    return batch


def tokenized(accepted: list[Parsed], spec: SourceSpec, tok, opts, schema) -> PreparedBatch:
    """The ``accepted`` problems with their token ids, less train and valid rows over
    ``max_length`` (and, with ``digit_answers_only``, train rows whose answer does not start with a
    digit), which become ``left_out``. Test rows are never cut: an evaluation set that loses its
    longest problems scores too high, and generation reads only the question anyway."""
    import pyarrow as pa

    questions = [opts.templates.question_text(p.problem.question) for p in accepted]
    steps = [p.problem.steps for p in accepted]
    answers = [p.problem.answer for p in accepted]
    q, s, a = tokenize_problems(tok, opts.templates, questions, steps, answers)
    teacher_cots, cots = tokenize_joined_cots(tok, opts.templates, steps)
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    batch = PreparedBatch(table=None)
    for i, parsed in enumerate(accepted):
        length = record_tokens(q[i], s[i], a[i])
        reason = _rejected(opts, spec.split, answers[i], length)
        if reason:
            if opts.strict:
                raise _strict_stop(spec, parsed.line, reason)
            batch.left_out.append({"source": spec.name, "line": parsed.line, "reason": reason})
            continue
        flags = parsed.problem.flags
        values = (questions[i], steps[i], answers[i], q[i], s[i], a[i], teacher_cots[i], cots[i],
                  f"{spec.path}:{parsed.line}", flags)
        for name, value in zip(COLUMNS, values):
            columns[name].append(value)
        batch.counts.add(len(steps[i]), length, flags)
    batch.table = pa.Table.from_pydict(columns, schema=schema)
    return batch


def _strict_stop(spec: SourceSpec, line: int, reason: str) -> StrictRejectError:
    return StrictRejectError(f"{spec.path}:{line}: {reason} (--strict stops at the first reject)")


def _rejected(opts, split: str, answer: str, length: int) -> str | None:
    """Why a tokenised row is left out, or None. Never for the test split."""
    if length > opts.max_length and split != "test":
        return f"too long: {length} tokens > --max-length {opts.max_length}"
    if opts.digit_answers_only and split == "train" and not answer[:1].isdigit():
        return f"answer not starting with a digit: {answer!r} (--digit-answers-only, CODI's training filter)"
    return None
