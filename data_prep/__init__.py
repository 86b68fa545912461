"""Stage 1: raw GSM8K-style data -> tokenized, step-annotated shards (``python -m data_prep --help``).

The names below load their modules when first used: a build's worker processes, which import
``data_prep.build``, then never import ``datasets``."""
from __future__ import annotations

import importlib

_EXPORTS = {"ShardSet": "loader", "load_shards": "loader", "ShardError": "manifest", "ShardsNotFound": "manifest",
            "read_manifest": "manifest"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
