"""``Vocab``: the token ids a run is built and laid out with, read once from its shards.

    vocab = Vocab.of(load_shards("data/shards"))
    vocab.special["latent"], vocab.size, vocab.original
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.latent.methods.base import ADDED_TOKENS


@dataclass(frozen=True)
class Vocab:
    special: dict[str, int]   # the layout tokens (``ShardSet.layout_tokens``): special ids and step brackets
    size: int                 # the tokenizer's length: the rows of the base's tables
    original: int             # the vocabulary before data_prep added its tokens: the step decoder's classes

    @classmethod
    def of(cls, shards) -> Vocab:
        return cls(shards.layout_tokens, len(shards.tokenizer), shards.original_vocab_size)

    def added_ids(self) -> tuple[int, ...]:
        """The latent tokens' ids (start/latent/end, bot/eot): the rows a method may seed."""
        return tuple(self.special[name] for name in ADDED_TOKENS if name != "pad")
