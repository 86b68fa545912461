"""Build tokenized, step-annotated shards from raw sources.

    python -m data_prep build --source gsm8k-aug:data/synth/train.txt --source gsm8k-aug:data/synth/test.txt \\
        --tokenizer data/tok --out data/shards

Writes into a temporary sibling directory and renames it into place only when complete, so an
interrupted build never leaves a directory that looks valid. Output bytes depend only on the
inputs, the tokenizer and the options (no timestamps), so a rebuild gives the same sha256s.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from common.cli import UserError
from common.hashing import sha256_file

from .manifest import MANIFEST, SCHEMA_VERSION, TOKENIZER_DIR
from .sources import SourceSpec, parse_source_spec, read_source
from .split_writer import BuildOutput
from .templates import Templates, tokenize_joined_cots, tokenize_problems
from .tokenizer import add_latent_tokens, fingerprint, load_pretrained
from .workers import Workers


class StrictRejectError(ValueError):
    """``--strict`` met a malformed record."""


@dataclass
class BuildOptions:
    sources: list[str]
    tokenizer: str
    out: str
    shards: int = 1
    strict: bool = False
    max_length: int = 1024
    templates: Templates = field(default_factory=Templates)
    overwrite: bool = False
    digit_answers_only: bool = False    # CODI's training filter: train answers must start with a digit
    batch_size: int = 4096              # records read, tokenised and written at a time: what memory holds
    workers: int = 1                    # processes that tokenise (1: this one); the command line: every core


def record_tokens(question_ids: list[int], step_ids: list[list[int]], answer_ids: list[int]) -> int:
    """A record's explicit-CoT length, the one ``--max-length`` is compared with: question, steps,
    answer and the EOS the layouts append."""
    return len(question_ids) + sum(map(len, step_ids)) + len(answer_ids) + 1


def build_source(spec: SourceSpec, opts: BuildOptions, out: BuildOutput, workers: Workers, log) -> dict:
    """Read, tokenise and write one source, ``opts.batch_size`` records at a time -> its counts.
    Batches are read and checked in a thread, tokenised here or in ``workers``, written in order."""
    read = rejected = 0
    progress = Progress(spec, log)
    for read, rejects, (kept, left_out) in workers.tokenized(read_ahead(parsed_batches(spec, opts)), spec.split):
        for reject in rejects:
            out.rejects.add(reject)
        for reject in left_out:
            out.rejects.add(reject, after_tokenising=spec.split)
        out.writers[spec.split].write(kept)
        rejected += len(rejects) + len(left_out)
        progress.show(read)
    digest = sha256_file(spec.path) if spec.kind != "hub" else None
    return {"source": spec.name, "split": spec.split, "sha256": digest,
            "read": read, "accepted": read - rejected, "rejected": rejected}


def parsed_batches(spec: SourceSpec, opts: BuildOptions):
    """-> (records read so far, the reader's rejects, accepted rows) per ``opts.batch_size`` rows."""
    read, rejects, batch = 0, [], []
    for item in read_source(spec):
        read += 1
        if item.reject:
            if opts.strict:
                raise StrictRejectError(f"{spec.path}:{item.line}: {item.reject} (--strict stops at the first reject)")
            rejects.append({"source": spec.name, "line": item.line, "reason": item.reject})
        else:
            p = item.problem
            batch.append({"question": p.question, "steps": p.steps, "answer": p.answer, "flags": p.flags,
                          "source": f"{spec.path}:{item.line}", "line": item.line, "source_name": spec.name})
        if len(batch) == opts.batch_size:
            yield read, rejects, batch
            rejects, batch = [], []
    yield read, rejects, batch


def read_ahead(batches, depth: int = 2):
    """``batches`` made in a thread, at most ``depth`` ahead of the caller (memory: that many
    batches); an error there is raised here."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def make() -> None:
        try:
            for batch in batches:
                ready.put(batch)
        except BaseException as err:        # handed to the caller, raised where it reads
            ready.put(err)
        ready.put(done)

    threading.Thread(target=make, daemon=True).start()
    while (item := ready.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def tokenized(rows: list[dict], split: str, tok, opts: BuildOptions) -> tuple[list[dict], list[dict]]:
    """-> (``rows`` kept, with their token ids; the rejects of those left out): train and valid rows
    over ``max_length`` (and, with ``digit_answers_only``, train rows whose answer does not start
    with a digit). Test rows are never cut: an evaluation set that loses its longest problems scores
    too high, and generation reads only the question anyway."""
    if not rows:
        return [], []
    for row in rows:
        row["question"] = opts.templates.question_text(row["question"])
    q, s, a = tokenize_problems(tok, opts.templates, [r["question"] for r in rows],
                                [r["steps"] for r in rows], [r["answer"] for r in rows])
    teacher_cots, cots = tokenize_joined_cots(tok, opts.templates, [r["steps"] for r in rows])
    kept, left_out = [], []
    for row, q_ids, s_ids, a_ids, teacher_cot, cot in zip(rows, q, s, a, teacher_cots, cots):
        length = record_tokens(q_ids, s_ids, a_ids)
        reason = _rejected(opts, split, row["answer"], length)
        if reason:
            if opts.strict:
                raise StrictRejectError(f"{row['source']}: {reason} (--strict stops at the first reject)")
            left_out.append({"source": row["source_name"], "line": row["line"], "reason": reason})
            continue
        row.update(question_ids=q_ids, step_ids=s_ids, answer_ids=a_ids, teacher_cot_ids=teacher_cot, cot_ids=cot,
                   n_tokens=length)
        kept.append(row)
    return kept, left_out


def _rejected(opts: BuildOptions, split: str, answer: str, length: int) -> str | None:
    """Why a tokenised row is left out, or None. Never for the test split."""
    if length > opts.max_length and split != "test":
        return f"too long: {length} tokens > --max-length {opts.max_length}"
    if opts.digit_answers_only and split == "train" and not answer[:1].isdigit():
        return f"answer not starting with a digit: {answer!r} (--digit-answers-only, CODI's training filter)"
    return None


class Progress:
    """A line every ``EVERY_S`` seconds on a long source: records read, records/s and, for a file of
    one record per line, the time left."""
    EVERY_S = 10.0

    def __init__(self, spec: SourceSpec, log):
        self.spec, self.log, self.start = spec, log, time.perf_counter()
        self.last, self.expected = self.start, None

    def show(self, read: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.EVERY_S:
            return
        if self.expected is None and self.spec.kind in LINE_KINDS:     # counted once, when a line is due
            self.expected = _lines(self.spec.path)
        self.last, rate = now, read / (now - self.start)
        left = f", about {(self.expected - read) / rate:.0f} s left" if self.expected and self.expected > read else ""
        self.log(f"  {self.spec.name}: {read} records read, {rate:.0f}/s{left}")


LINE_KINDS = {"gsm8k", "gsm8k-aug", "gsm8k-aug-nl", "gsm-hard"}     # one record per non-blank line


def _lines(path: str) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def run_build(opts: BuildOptions, log=print) -> dict:
    """Build the shard directory ``opts.out``; return the manifest. Memory holds a few batches of
    ``opts.batch_size`` records (two read ahead, two per worker in flight), whatever the size of
    the sources."""
    if os.path.exists(opts.out) and not opts.overwrite:
        raise FileExistsError(f"{opts.out}: exists; pass --overwrite to replace it")
    if min(opts.shards, opts.batch_size, opts.workers) < 1:
        raise ValueError("--shards, --batch-size and --workers must be at least 1")
    start = time.perf_counter()
    specs = [parse_source_spec(s) for s in opts.sources]
    tok = load_pretrained(opts.tokenizer)
    special = add_latent_tokens(tok)
    log(f"reading {len(specs)} source(s)")
    parent = os.path.dirname(os.path.abspath(opts.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(opts.out)}.building-", dir=parent)
    try:
        out = BuildOutput(tmp)
        with Workers(opts, tok) as workers:
            for spec in specs:
                c = build_source(spec, opts, out, workers, log)
                out.per_source.append(c)
                log(f"  {c['source']} -> {c['split']}: {c['read']} read, {c['accepted']} accepted, "
                    f"{c['rejected']} rejected")
        splits = out.finish(opts.shards)
        tok.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
        manifest = make_manifest(out, splits, tok, special, opts)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
        _replace_dir(tmp, opts.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    c = manifest["counts"]
    log(f"wrote {opts.out}: {c['accepted']} accepted, {c['rejected']} rejected, {c['flagged']} flagged "
        f"of {c['read']} read in {time.perf_counter() - start:.1f}s")
    return manifest


def _replace_dir(tmp: str, out: str) -> None:
    if os.path.exists(out):
        trash = f"{tmp}.old"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, out)


def make_manifest(out: BuildOutput, splits: dict, tok, special: dict, opts: BuildOptions) -> dict:
    flags = sum((w.flags for w in out.writers.values()), Counter())
    return {
        "schema_version": SCHEMA_VERSION,
        "counts": {"read": out.accepted + out.rejects.total, "accepted": out.accepted,
                   "rejected": out.rejects.total, "flagged": sum(w.flagged for w in out.writers.values())},
        "rejected_by_reason": dict(sorted(out.rejects.reasons.items())),
        "flagged_by_reason": dict(sorted(flags.items())),
        "sources": out.per_source,
        "splits": splits,
        "special_tokens": special,
        "templates": opts.templates.as_dict(),
        "max_length": opts.max_length,
        "digit_answers_only": opts.digit_answers_only,
        "tokenizer": {"fingerprint": fingerprint(tok), "size": len(tok), "dir": TOKENIZER_DIR,
                      "source": opts.tokenizer, "bos_on_question": _adds_bos(tok)},
    }


def _adds_bos(tok) -> bool:
    ids = tok("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id


def main_build(opts: BuildOptions) -> int:
    try:
        run_build(opts, log=lambda line: print(line, flush=True))     # progress shows as it comes in a log file
    except StrictRejectError as err:           # the data, not the command: exit 1
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (FileExistsError, ValueError) as err:
        raise UserError(str(err)) from None
    return 0
