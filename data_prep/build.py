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

from .manifest import MANIFEST, REJECTS, SCHEMA_VERSION, TOKENIZER_DIR
from .sources import SourceSpec, parse_source_spec, read_source
from .templates import Templates, tokenize_joined_cots, tokenize_problems
from .tokenizer import add_latent_tokens, fingerprint, load_pretrained

SPLITS = ("train", "valid", "test")


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


@dataclass
class Collected:
    """Accepted problems (parallel lists, per split) and rejects, in input order."""
    rows: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    rejects: list[dict] = field(default_factory=list)
    per_source: list[dict] = field(default_factory=list)


def collect(specs: list[SourceSpec], strict: bool) -> Collected:
    got = Collected()
    for source_index, spec in enumerate(specs):
        read = rejected = 0
        for item in read_source(spec):
            read += 1
            where = f"{spec.path}:{item.line}"
            if item.reject:
                if strict:
                    raise StrictRejectError(f"{where}: {item.reject} (--strict stops at the first reject)")
                rejected += 1
                got.rejects.append({"source": spec.name, "line": item.line, "reason": item.reject})
                continue
            p = item.problem
            got.rows[spec.split].append({"question": p.question, "steps": p.steps, "answer": p.answer,
                                         "flags": p.flags, "source": where,
                                         "source_index": source_index, "line": item.line})
        digest = sha256_file(spec.path) if spec.kind != "hub" else None
        got.per_source.append({"source": spec.name, "split": spec.split, "sha256": digest,
                               "read": read, "accepted": read - rejected, "rejected": rejected})
    return got


def record_tokens(question_ids: list[int], step_ids: list[list[int]], answer_ids: list[int]) -> int:
    """A record's explicit-CoT length, the one ``--max-length`` is compared with: question, steps,
    answer and the EOS the layouts append."""
    return len(question_ids) + sum(map(len, step_ids)) + len(answer_ids) + 1


def tokenize_rows(got: Collected, tok, opts: BuildOptions) -> None:
    """Add token ids to every row; train and valid rows over ``max_length`` (and, with
    ``digit_answers_only``, train rows whose answer does not start with a digit) move to the
    rejects. Test rows are never cut: an evaluation set that loses its longest problems scores too
    high, and generation reads only the question anyway."""
    for split in SPLITS:
        rows = got.rows[split]
        if not rows:
            continue
        for row in rows:
            row["question"] = opts.templates.question_text(row["question"])
        q, s, a = tokenize_problems(tok, opts.templates, [r["question"] for r in rows],
                                    [r["steps"] for r in rows], [r["answer"] for r in rows])
        teacher_cots, cots = tokenize_joined_cots(tok, opts.templates, [r["steps"] for r in rows])
        kept = []
        for row, q_ids, s_ids, a_ids, teacher_cot, cot in zip(rows, q, s, a, teacher_cots, cots):
            length = record_tokens(q_ids, s_ids, a_ids)
            reason = _rejected(opts, split, row["answer"], length)
            if reason:
                _reject(got, row, reason, opts.strict)
                continue
            row.update(question_ids=q_ids, step_ids=s_ids, answer_ids=a_ids, teacher_cot_ids=teacher_cot, cot_ids=cot,
                       n_tokens=length)
            kept.append(row)
        got.rows[split] = kept
        for index, row in enumerate(kept):
            row["id"] = f"{split}-{index:06d}"


def _rejected(opts: BuildOptions, split: str, answer: str, length: int) -> str | None:
    """Why a tokenised row is left out, or None. Never for the test split."""
    if length > opts.max_length and split != "test":
        return f"too long: {length} tokens > --max-length {opts.max_length}"
    if opts.digit_answers_only and split == "train" and not answer[:1].isdigit():
        return f"answer not starting with a digit: {answer!r} (--digit-answers-only, CODI's training filter)"
    return None


def _reject(got: Collected, row: dict, reason: str, strict: bool) -> None:
    if strict:
        raise StrictRejectError(f"{row['source']}: {reason} (--strict stops at the first reject)")
    counts = got.per_source[row["source_index"]]
    counts["accepted"] -= 1
    counts["rejected"] += 1
    got.rejects.append({"source": counts["source"], "line": row["line"], "reason": reason})


def run_build(opts: BuildOptions, log=print) -> dict:
    """Build the shard directory ``opts.out``; return the manifest."""
    if os.path.exists(opts.out) and not opts.overwrite:
        raise FileExistsError(f"{opts.out}: exists; pass --overwrite to replace it")
    if opts.shards < 1:
        raise ValueError("--shards must be at least 1")
    start = time.perf_counter()
    specs = [parse_source_spec(s) for s in opts.sources]
    tok = load_pretrained(opts.tokenizer)
    special = add_latent_tokens(tok)
    log(f"reading {len(specs)} source(s)")
    got = collect(specs, opts.strict)
    tokenize_rows(got, tok, opts)
    for c in got.per_source:            # after the length check, whose rejects count too
        log(f"  {c['source']} -> {c['split']}: {c['read']} read, {c['accepted']} accepted, {c['rejected']} rejected")
    parent = os.path.dirname(os.path.abspath(opts.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(opts.out)}.building-", dir=parent)
    try:
        splits = {split: write_split(tmp, split, got.rows[split], opts.shards)
                  for split in SPLITS if got.rows[split]}
        with open(os.path.join(tmp, REJECTS), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in got.rejects)
        tok.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
        manifest = make_manifest(got, splits, tok, special, opts)
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


def write_split(root: str, split: str, rows: list[dict], n_shards: int) -> dict:
    """Arrow IPC stream shards (what ``datasets.Dataset.from_file`` reads), contiguous row ranges."""
    import datasets
    import pyarrow as pa

    from .loader import FEATURES

    columns = {name: [r[name] for r in rows] for name in FEATURES}
    table = datasets.Dataset.from_dict(columns, features=FEATURES).data.table
    n_shards = min(n_shards, len(rows))
    os.makedirs(os.path.join(root, split))
    shards, bounds = [], [len(rows) * i // n_shards for i in range(n_shards + 1)]
    for index in range(n_shards):
        part = table.slice(bounds[index], bounds[index + 1] - bounds[index])
        rel = os.path.join(split, f"data-{index:05d}-of-{n_shards:05d}.arrow")
        with pa.OSFile(os.path.join(root, rel), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        shards.append({"file": rel, "rows": part.num_rows, "sha256": sha256_file(os.path.join(root, rel))})
    return {"rows": len(rows), "shards": shards,
            "step_counts": _histogram(len(r["steps"]) for r in rows),
            "token_lengths": _histogram(16 * (r["n_tokens"] // 16) for r in rows)}


def _histogram(values) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def make_manifest(got: Collected, splits: dict, tok, special: dict, opts: BuildOptions) -> dict:
    accepted = [r for split in SPLITS for r in got.rows[split]]
    flags = Counter(f for r in accepted for f in r["flags"])
    reasons = Counter(r["reason"].split(":")[0].split(" (")[0] for r in got.rejects)
    return {
        "schema_version": SCHEMA_VERSION,
        "counts": {"read": len(accepted) + len(got.rejects), "accepted": len(accepted),
                   "rejected": len(got.rejects), "flagged": sum(1 for r in accepted if r["flags"])},
        "rejected_by_reason": dict(sorted(reasons.items())),
        "flagged_by_reason": dict(sorted(flags.items())),
        "sources": got.per_source,
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
        run_build(opts)
    except StrictRejectError as err:           # the data, not the command: exit 1
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (FileExistsError, ValueError) as err:
        raise UserError(str(err)) from None
    return 0
