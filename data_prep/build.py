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
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

from common.cli import UserError
from common.hashing import sha256_file

from .batch import StrictRejectError
from .manifest import MANIFEST, SCHEMA_VERSION, TOKENIZER_DIR
from .sources import FORMATS, SourceSpec, open_source, parse_source_spec, text_lines
from .split_writer import BuildOutput
from .templates import Templates
from .tokenizer import add_latent_tokens, fingerprint, load_pretrained
from .workers import Workers


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
    batch_size: int = 4096              # records read, parsed, tokenised and written at a time: what memory holds
    workers: int = 1                    # processes that parse and tokenise (1: this one); the command line: every core


def build_source(spec: SourceSpec, opts: BuildOptions, out: BuildOutput, workers: Workers, log) -> dict:
    """Read, parse, tokenise and write one source, ``opts.batch_size`` records at a time -> its
    counts. Batches are prepared here or in ``workers``, and written in input order."""
    records, parser = open_source(spec)
    read = rejected = 0
    progress = Progress(spec, log)
    for read, batch in workers.prepared(raw_batches(records, opts.batch_size), spec, parser):
        for reject in batch.rejects:
            out.rejects.add(reject)
        for reject in batch.left_out:
            out.rejects.add(reject, after_tokenising=spec.split)
        out.writers[spec.split].write(batch.table, batch.counts)
        rejected += len(batch.rejects) + len(batch.left_out)
        progress.show(read)
    digest = sha256_file(spec.path) if spec.kind != "hub" else None
    return {"source": spec.name, "split": spec.split, "sha256": digest,
            "read": read, "accepted": read - rejected, "rejected": rejected}


def raw_batches(records, size: int):
    """-> (records read so far, the next ``size`` raw records); the last may be short, and is empty
    only for a source of no records."""
    read, batch = 0, []
    for record in records:
        read += 1
        batch.append(record)
        if len(batch) == size:
            yield read, batch
            batch = []
    if batch or not read:
        yield read, batch


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


LINE_KINDS = {kind for kind, form in FORMATS.items() if form and form[0] is text_lines}   # a record a line


def _lines(path: str) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def run_build(opts: BuildOptions, log=print) -> dict:
    """Build the shard directory ``opts.out``; return the manifest. Memory holds a few batches of
    ``opts.batch_size`` records (two per worker in flight), whatever the size of the sources."""
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
    flags = sum((w.counts.flags for w in out.writers.values()), Counter())
    return {
        "schema_version": SCHEMA_VERSION,
        "counts": {"read": out.accepted + out.rejects.total, "accepted": out.accepted,
                   "rejected": out.rejects.total, "flagged": sum(w.counts.flagged for w in out.writers.values())},
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
