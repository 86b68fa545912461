"""Worker processes that prepare a build's batches (``data_prep build --workers N``).

    with Workers(opts, tok) as workers:
        for read, batch in workers.prepared(raw_batches, spec, parser): ...

Each batch of raw records (lines, JSON objects) is parsed, checked, tokenised and laid out as
Arrow by ``batch.prepare_batch``. One worker (the default of ``BuildOptions``) does it in this
process. More start, each with its own copy of the tokenizer, when a source reaches its third
batch (a build of small sources runs in one process); at most two batches per worker are in
flight, and results come back in input order, so memory stays a few batches and the shards are
those of one process.
"""
from __future__ import annotations

import os
from collections import deque

from .batch import prepare_batch
from .templates import direct_backend

_WORKER: dict = {}
POOL_FROM_BATCH = 2     # a source's third batch: on two, the pool's start-up costs more than it saves


class _FastBackend:
    """What ``templates.encode`` calls of a fast tokenizer: its Rust backend alone (a worker then
    needs neither transformers nor its memory)."""
    is_fast = True

    def __init__(self, serialized: str):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(serialized)


def _start(opts, backend: str | None, schema) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"     # each worker one core: the pool is the parallelism
    if backend is not None:
        tok = _FastBackend(backend)
    else:                                               # a slow tokenizer: the whole of it
        from .tokenizer import add_latent_tokens, load_pretrained

        tok = load_pretrained(opts.tokenizer)
        add_latent_tokens(tok)
    _WORKER.update(tok=tok, opts=opts, schema=schema)


def _prepared(records, spec, parser):
    return prepare_batch(records, spec, parser, _WORKER["tok"], _WORKER["opts"], _WORKER["schema"])


class Workers:
    def __init__(self, opts, tok):
        from .split_writer import record_schema

        self.opts, self.tok, self._pool = opts, tok, None
        self.schema = record_schema().remove(0).remove_metadata()     # every field but the id, given in order

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *_) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def prepared(self, batches, spec, parser):
        """(records read, ``batch.prepare_batch`` of the batch) per batch of raw records, in order."""
        pending: deque = deque()
        for number, (read, records) in enumerate(batches):
            if self._pool is None and (self.opts.workers == 1 or number < POOL_FROM_BATCH):
                yield read, prepare_batch(records, spec, parser, self.tok, self.opts, self.schema)
                continue
            pending.append((read, self._executor().submit(_prepared, records, spec, parser)))
            if len(pending) > 2 * self.opts.workers:
                read, done = pending.popleft()
                yield read, done.result()
        while pending:
            read, done = pending.popleft()
            yield read, done.result()

    def _executor(self):
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            backend = direct_backend(self.tok)
            serialized = None if backend is None else backend.to_str()
            self._pool = ProcessPoolExecutor(self.opts.workers, mp_context=get_context("spawn"), initializer=_start,
                                             initargs=(self.opts, serialized, self.schema))
        return self._pool
