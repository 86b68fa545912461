"""Where a streaming build puts what it has made, batch by batch: each split's records, the rejects.

    out = BuildOutput(tmp_dir)
    out.writers["train"].write(table, counts)        # ids given here, in input order
    out.rejects.add(reject, after_tokenising="train")
    splits = out.finish(n_shards)                    # -> the manifest's "splits"; rejects.jsonl written

A split's records go to one Arrow stream as they come (memory holds one batch), then are cut into
``n_shards`` files of contiguous rows from the memory-mapped stream. The rejects keep the order a
build that held everything in memory wrote: the readers' rejects in input order, then each
split's tokenised rows that were left out (too long, ...), train, valid, test.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field

from common.hashing import sha256_file

from .manifest import REJECTS

SPLITS = ("train", "valid", "test")


def record_schema():
    """The shards' Arrow schema (``loader.FEATURES``, with the metadata ``datasets`` reads)."""
    from .loader import FEATURES

    return FEATURES.arrow_schema


def histogram(counts: Counter) -> dict[str, int]:
    return {str(k): v for k, v in sorted(counts.items())}


@dataclass
class SplitCounts:
    """What the manifest counts of a split's records: steps, token lengths (in bins of 16), flags."""
    rows: int = 0
    flagged: int = 0
    steps: Counter = field(default_factory=Counter)
    lengths: Counter = field(default_factory=Counter)
    flags: Counter = field(default_factory=Counter)

    def add(self, n_steps: int, n_tokens: int, flags: list[str]) -> None:
        self.rows += 1
        self.steps[n_steps] += 1
        self.lengths[16 * (n_tokens // 16)] += 1
        self.flags.update(flags)
        self.flagged += bool(flags)

    def merge(self, other: SplitCounts) -> None:
        self.rows += other.rows
        self.flagged += other.flagged
        for mine, theirs in ((self.steps, other.steps), (self.lengths, other.lengths), (self.flags, other.flags)):
            mine.update(theirs)


class SplitWriter:
    """One split's records, streamed to ``ROOT/SPLIT.stream`` and counted as they come."""

    def __init__(self, root: str, split: str):
        self.root, self.split, self.counts = root, split, SplitCounts()
        self.path = os.path.join(root, f"{split}.stream")
        self._sink = self._writer = None

    @property
    def rows(self) -> int:
        return self.counts.rows

    def write(self, table, counts: SplitCounts) -> None:
        """Append ``table`` (tokenised records kept, every field but ``id``; ``counts`` theirs),
        giving each record its ``id``."""
        import pyarrow as pa

        if not table.num_rows:
            return
        if self._writer is None:
            self._schema = record_schema()
            self._sink = pa.OSFile(self.path, "wb")
            self._writer = pa.ipc.new_stream(self._sink, self._schema)
        ids = pa.array([f"{self.split}-{n:06d}" for n in range(self.rows, self.rows + table.num_rows)], pa.string())
        self._writer.write_table(pa.Table.from_arrays([ids, *table.columns], schema=self._schema))
        self.counts.merge(counts)

    def finish(self, n_shards: int) -> dict | None:
        """Cut the stream into shards -> the split's manifest entry (None: no record)."""
        if self._writer is None:
            return None
        self._writer.close()
        self._sink.close()
        n_shards = min(n_shards, self.rows)
        os.makedirs(os.path.join(self.root, self.split))
        files = [os.path.join(self.split, f"data-{i:05d}-of-{n_shards:05d}.arrow") for i in range(n_shards)]
        if n_shards == 1:
            os.replace(self.path, os.path.join(self.root, files[0]))
            sizes = [self.rows]
        else:
            sizes = self._cut(files)
        shards = [{"file": rel, "rows": rows, "sha256": sha256_file(os.path.join(self.root, rel))}
                  for rel, rows in zip(files, sizes)]
        return {"rows": self.rows, "shards": shards, "step_counts": histogram(self.counts.steps),
                "token_lengths": histogram(self.counts.lengths)}

    def _cut(self, files: list[str]) -> list[int]:
        import pyarrow as pa

        with pa.memory_map(self.path) as source:
            table = pa.ipc.open_stream(source).read_all()        # views of the mapped file
            bounds = [self.rows * i // len(files) for i in range(len(files) + 1)]
            for rel, start, end in zip(files, bounds, bounds[1:]):
                with pa.OSFile(os.path.join(self.root, rel), "wb") as sink, \
                        pa.ipc.new_stream(sink, table.schema) as writer:
                    writer.write_table(table.slice(start, end - start))
        os.remove(self.path)
        return [end - start for start, end in zip(bounds, bounds[1:])]


class RejectLog:
    """Rejects streamed to files in the order described above, counted by reason."""

    def __init__(self, root: str):
        self.root, self.total, self.reasons = root, 0, Counter()
        self._files = {part: open(os.path.join(root, f"rejects.{part}"), "w", encoding="utf-8")
                       for part in ("read", *SPLITS)}

    def add(self, reject: dict, after_tokenising: str | None = None) -> None:
        """``after_tokenising``: the split a tokenised row was left out of (None: the reader's)."""
        self._files[after_tokenising or "read"].write(json.dumps(reject, ensure_ascii=False) + "\n")
        self.total += 1
        self.reasons[reject["reason"].split(":")[0].split(" (")[0]] += 1

    def finish(self) -> None:
        with open(os.path.join(self.root, REJECTS), "w", encoding="utf-8") as out:
            for handle in self._files.values():
                handle.close()
                with open(handle.name, encoding="utf-8") as piece:
                    shutil.copyfileobj(piece, out)
                os.remove(handle.name)


class BuildOutput:
    def __init__(self, root: str):
        self.writers = {split: SplitWriter(root, split) for split in SPLITS}
        self.rejects = RejectLog(root)
        self.per_source: list[dict] = []

    def finish(self, n_shards: int) -> dict:
        self.rejects.finish()
        splits = {split: writer.finish(n_shards) for split, writer in self.writers.items()}
        return {split: info for split, info in splits.items() if info is not None}

    @property
    def accepted(self) -> int:
        return sum(w.rows for w in self.writers.values())
