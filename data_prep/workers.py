"""Worker processes that tokenise a build's batches (``data_prep build --workers N``).

    with Workers(opts, tok) as workers:
        for read, rejects, (kept, left_out) in workers.tokenized(batches, split): ...

One worker (the default of ``BuildOptions``) tokenises in this process. More start, each with its
own copy of the tokenizer, when a source reaches its second batch (a small build never pays their
start-up); at most two batches per worker are in flight, and results come back in input order,
so memory stays a few batches and the shards are those of one process.
"""
from __future__ import annotations

import os
from collections import deque

_WORKER: dict = {}


class _FastBackend:
    """What ``templates.encode`` calls of a fast tokenizer: its Rust backend alone (a worker then
    needs neither transformers nor its memory)."""
    is_fast = True

    def __init__(self, serialized: str):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_str(serialized)


def _start(opts, backend: str | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"     # each worker one core: the pool is the parallelism
    if backend is not None:
        tok = _FastBackend(backend)
    else:                                               # a slow tokenizer: the whole of it
        from .tokenizer import add_latent_tokens, load_pretrained

        tok = load_pretrained(opts.tokenizer)
        add_latent_tokens(tok)
    _WORKER.update(tok=tok, opts=opts)


def _tokenized(rows: list[dict], split: str):
    from .build import tokenized

    return tokenized(rows, split, _WORKER["tok"], _WORKER["opts"])


class Workers:
    def __init__(self, opts, tok):
        self.opts, self.tok, self._pool = opts, tok, None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *_) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def tokenized(self, batches, split: str):
        """(records read, the reader's rejects, ``build.tokenized`` of the rows) per batch, in order."""
        from .build import tokenized

        pending: deque = deque()
        for number, (read, rejects, rows) in enumerate(batches):
            in_here = self.opts.workers == 1 or (number == 0 and self._pool is None)   # one batch: no pool yet
            if in_here:
                yield read, rejects, tokenized(rows, split, self.tok, self.opts)
                continue
            pending.append((read, rejects, self._executor().submit(_tokenized, rows, split)))
            if len(pending) > 2 * self.opts.workers:
                read, rejects, done = pending.popleft()
                yield read, rejects, done.result()
        while pending:
            read, rejects, done = pending.popleft()
            yield read, rejects, done.result()

    def _executor(self):
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            backend = getattr(self.tok, "_tokenizer", None) if getattr(self.tok, "is_fast", False) else None
            plain = backend is not None and not backend.truncation and not backend.padding
            self._pool = ProcessPoolExecutor(self.opts.workers, mp_context=get_context("spawn"), initializer=_start,
                                             initargs=(self.opts, backend.to_str() if plain else None))
        return self._pool
