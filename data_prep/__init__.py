"""Stage 1: raw GSM8K-style data -> tokenized, step-annotated shards (``python -m data_prep --help``)."""
from .loader import ShardSet, load_shards
from .manifest import ShardError, ShardsNotFound, read_manifest

__all__ = ["ShardSet", "ShardError", "ShardsNotFound", "load_shards", "read_manifest"]
