"""The shard directory contract: ``manifest.json`` + Arrow shards + ``rejects.jsonl`` + ``tokenizer/``.

    python -m data_prep verify data/shards      # exit 1 on any mismatch
"""
from __future__ import annotations

import json
import os

from common.cli import UserError
from common.hashing import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
TOKENIZER_DIR = "tokenizer"


class ShardError(RuntimeError):
    """A shard directory that does not match its manifest."""


class ShardsNotFound(ShardError, UserError):
    """No shard directory where one was given (a user's mistake: exit 2 on the command lines)."""


def read_manifest(shard_dir: str) -> dict:
    path = os.path.join(shard_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ShardsNotFound(f"{path}: missing, so {shard_dir} is not a shard directory; build one with "
                             f"`python -m data_prep build ... --out {shard_dir}`")
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema_version {manifest.get('schema_version')} is not {SCHEMA_VERSION}; "
                         "rebuild the shards with this version of data_prep")
    return manifest


def shard_problems(shard_dir: str, manifest: dict) -> list[str]:
    """Every shard whose bytes differ from the manifest's sha256, as readable messages."""
    problems = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = os.path.join(shard_dir, shard["file"])
            if not os.path.isfile(path):
                problems.append(f"{path}: missing (split {split})")
            elif sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from {MANIFEST}; the file was changed or corrupted, "
                                "rebuild the shards")
    return problems
