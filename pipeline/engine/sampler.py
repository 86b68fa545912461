"""Per-rank batches for one epoch at one curriculum stage, from verified shards.

Every rank builds the same permutation (seeded by run seed and epoch) and takes every
``world``-th record, truncated so all ranks get the same number of micro-batches (a multiple of
the accumulation steps): no rank waits on a collective the others never reach.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from itertools import islice

import torch

from data_prep.loader import Records
from pipeline.engine.config import CurriculumSettings
from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import MethodConfig, get_method, layout


def stage_for_epoch(epoch: int, curriculum: CurriculumSettings, method: str) -> int:
    """The method's curriculum stage at ``epoch`` (Coconut: ``start_stage + epoch // epochs_per_stage``)."""
    return get_method(method).stage_for_epoch(epoch, curriculum.start_stage, curriculum.epochs_per_stage)


@dataclass(frozen=True)
class RankSharding:
    """Which records this rank reads: every ``world``-th of the seeded order, in micro-batches."""
    micro_batch_size: int
    grad_accum: int
    rank: int
    world: int
    seed: int


def rank_indices(n_records: int, sharding: RankSharding, epoch: int, shuffle: bool,
                 max_steps: int = 0) -> list[list[int]]:
    """Record indices of each of this rank's micro-batches (a multiple of the accumulation steps);
    ``max_steps`` > 0 keeps the first that many optimizer steps of the epoch's order."""
    if shuffle:
        generator = torch.Generator().manual_seed(sharding.seed * 100_003 + epoch)
        order = torch.randperm(n_records, generator=generator).tolist()
    else:
        order = list(range(n_records))
    per_rank = len(order) // sharding.world
    mine = order[sharding.rank::sharding.world][:per_rank]
    n_batches = per_rank // sharding.micro_batch_size
    n_batches -= n_batches % sharding.grad_accum
    if max_steps:
        n_batches = min(n_batches, max_steps * sharding.grad_accum)
    return [mine[i * sharding.micro_batch_size:(i + 1) * sharding.micro_batch_size] for i in range(n_batches)]


def step_records(n_records: int, sharding: RankSharding, epoch: int, shuffle: bool, max_steps: int,
                 step_in_epoch: int) -> dict[int, list[int]]:
    """Every rank's record indices of the ``step_in_epoch``-th optimizer step (1-based) of ``epoch``:
    a batch's identity, found without asking the other ranks."""
    accum, records = sharding.grad_accum, {}
    for rank in range(sharding.world):
        mine = rank_indices(n_records, replace(sharding, rank=rank), epoch, shuffle, max_steps)
        records[rank] = [i for batch in mine[(step_in_epoch - 1) * accum:step_in_epoch * accum] for i in batch]
    return records


READ_AHEAD = 64      # micro-batches whose records are read at once


def iter_batches(records: Records | list[dict], indices: list[list[int]], special: dict[str, int], cfg: MethodConfig,
                 stage: int, prefix_ids: list[int], draw_seed: str | None = None):
    """Lay out and collate lazily, one micro-batch at a time. ``draw_seed`` (training): with
    ``cfg.uniform_prob`` an example trains at a stage drawn for it from this seed and its index."""
    span = cfg.latent_span(stage)
    for batch_indices, rows in _read(records, indices):
        examples = [layout(row, special, cfg, example_stage(cfg, stage, row, draw_seed, i), prefix_ids)
                    for i, row in zip(batch_indices, rows)]
        yield collate_aligned(examples, special["latent"], special["pad"], latent_span=span)


def _read(records: Records | list[dict], indices: list[list[int]]):
    """(a micro-batch's indices, its records), reading ``READ_AHEAD`` micro-batches from the shards
    at a time: records made and freed within every step have Python's allocator return their
    memory to the system and fault it in again at the next step (measured: P10)."""
    for start in range(0, len(indices), READ_AHEAD):
        window = indices[start:start + READ_AHEAD]
        flat = [i for batch in window for i in batch]
        rows = iter(records.take(flat) if isinstance(records, Records) else [records[i] for i in flat])
        for batch in window:
            yield batch, list(islice(rows, len(batch)))


def example_stage(cfg: MethodConfig, stage: int, record: dict, draw_seed: str | None, index: int) -> int:
    """``stage``, or with probability ``cfg.uniform_prob`` one drawn uniformly from 0..the record's
    steps (the reference's ``uniform_prob``); the same draw for the same seed and record on every
    rank and after a resume."""
    if draw_seed is None or cfg.uniform_prob == 0:
        return stage
    rng = random.Random(f"{draw_seed}/{index}")
    if rng.random() >= cfg.uniform_prob:
        return stage
    return rng.randrange(len(record["step_ids"]) + 1)
