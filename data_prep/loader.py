"""Open a shard directory for the next stages, verified against its manifest.

    from data_prep import load_shards
    shards = load_shards("data/shards")            # checks sha256s and the tokenizer fingerprint
    train = shards.split("train")                   # a datasets.Dataset of records
    records = shards.records("train")               # records[i] a dict, read from the memory-mapped Arrow
    shards.special_tokens["latent"]                 # token ids always come from here
    shards.layout_tokens                            # ... and with the step brackets, what layouts read
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import datasets

from .manifest import ShardError, ShardsNotFound, read_manifest, shard_problems

FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "question": datasets.Value("string"),
    "steps": datasets.List(datasets.Value("string")),
    "answer": datasets.Value("string"),
    "question_ids": datasets.List(datasets.Value("int32")),
    "step_ids": datasets.List(datasets.List(datasets.Value("int32"))),
    "answer_ids": datasets.List(datasets.Value("int32")),
    # CODI's teacher text: the steps but the last / all steps joined by the separator, tokenised once
    "teacher_cot_ids": datasets.List(datasets.Value("int32")),
    "cot_ids": datasets.List(datasets.Value("int32")),
    "source": datasets.Value("string"),
    "flags": datasets.List(datasets.Value("string")),
})


class Records(Sequence):
    """A split's records, read by index from its memory-mapped Arrow shards: ``records[i]`` one
    record (a dict, as ``Dataset.to_list`` gives it), ``records[a:b]`` and ``records.take(indices)``
    lists of them. Memory stays the size of what is read, not of the split: a rank of a run over
    millions of problems holds the records of its batches."""

    def __init__(self, dataset: datasets.Dataset):
        self.table = dataset.data.table             # the shards' Arrow table, memory-mapped

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self.table.slice(start, max(stop - start, 0)).to_pylist()
            return self.take(range(start, stop, step))
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        return self.table.slice(index % len(self), 1).to_pylist()[0]

    def take(self, indices) -> list[dict]:
        """The records at ``indices``, in their order. Each is a zero-copy slice of the mapped
        shards (Arrow's ``take`` would first join a many-batch column into one, reading it whole)."""
        import pyarrow as pa

        return pa.concat_tables([self.table.slice(i, 1) for i in indices]).to_pylist() if indices else []


@dataclass
class ShardSet:
    """A verified shard directory: manifest, tokenizer and the records of each split."""
    path: str
    manifest: dict
    tokenizer: object

    @property
    def special_tokens(self) -> dict[str, int]:
        return self.manifest["special_tokens"]

    @cached_property
    def layout_tokens(self) -> dict[str, int]:
        """The special-token ids and the ids of the step brackets that are one token (CODI's step
        targets find the steps by them): what ``pipeline.latent.methods.layout`` reads."""
        from .tokenizer import step_marker_ids

        return {**self.special_tokens, **step_marker_ids(self.tokenizer)}

    @cached_property
    def original_vocab_size(self) -> int:
        """The tokenizer's vocabulary before the latent tokens were added: the step decoder's."""
        from .tokenizer import original_vocab_size

        return original_vocab_size(self.tokenizer)

    def same_templates(self, recorded: dict) -> bool:
        """Whether ``recorded`` (a model's templates) lays text out as these shards do; options
        added since either was written count at their defaults."""
        from .templates import Templates

        return Templates.defaults_for(self.manifest["templates"]) == Templates.defaults_for(recorded)

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def records(self, name: str) -> Records:
        """The ``name`` split's records by index, never all of them as Python objects at once."""
        return Records(self.split(name))

    def split(self, name: str) -> datasets.Dataset:
        if name not in self.manifest["splits"]:
            raise ShardsNotFound(f"{self.path}: no {name!r} split (it has {', '.join(self.splits)})")
        files = [os.path.join(self.path, s["file"]) for s in self.manifest["splits"][name]["shards"]]
        parts = [datasets.Dataset.from_file(f) for f in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def load_shards(path: str, verify: bool = True, expected_fingerprint: str | None = None) -> ShardSet:
    """Load and check ``path``; a mismatch is an error, never a silent reuse.

    ``expected_fingerprint``: the fingerprint of the tokenizer the caller will use (e.g. a run's
    tokenizer); it must equal the one the ids were made with.
    """
    from .tokenizer import fingerprint, load_pretrained

    manifest = read_manifest(path)
    if verify:
        problems = shard_problems(path, manifest)
        if problems:
            raise ShardError("; ".join(problems))
    tok_dir = os.path.join(path, manifest["tokenizer"]["dir"])
    tokenizer = load_pretrained(tok_dir)
    actual = fingerprint(tokenizer)
    recorded = manifest["tokenizer"]["fingerprint"]
    if actual != recorded:
        raise ShardError(f"{tok_dir}: tokenizer fingerprint {actual[:12]} differs from the manifest's "
                         f"{recorded[:12]}; the tokenizer was changed after the build, rebuild the shards")
    if expected_fingerprint is not None and expected_fingerprint != recorded:
        raise ShardError(f"{path}: shards were tokenized with tokenizer {recorded[:12]}, not the expected "
                         f"{expected_fingerprint[:12]}; rebuild them with `python -m data_prep build --tokenizer ...`")
    return ShardSet(path, manifest, tokenizer)
