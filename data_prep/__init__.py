"""Stage 1: raw GSM8K-style data -> tokenized, step-annotated shards (``python -m data_prep --help``)."""
from .cli_errors import UserError, run_cli
from .loader import ShardSet, load_shards
from .manifest import ShardError, ShardsNotFound

__all__ = ["ShardSet", "ShardError", "ShardsNotFound", "UserError", "load_shards", "run_cli"]
