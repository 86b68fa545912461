"""Helper for test_one_rank_gather: on one rank, the gathered policy's partitions-as-parameters path
against DeepSpeed's own gather (``apply_gather_policy(..., one_rank_partitions=False)``), from the
same weights: 3 steps, a checkpoint, 2 more steps; then a fresh engine of each path resumed from the
other's checkpoint runs those 2 steps again. Saves every loss and the final weights.

    python -m tests.distributed.one_rank_gather OUT.pt CHECKPOINT_DIR
"""
import sys

import torch

from benchmarks.overhead import CASES, batches, zero3_engine
from pipeline.engine.distributed import init_distributed, teardown
from pipeline.engine.gather_policy import GATHERED, step_gather

CASE = "codi+simcot"        # a base and a step decoder, persistent norm weights, the projection


def engine_of(one_rank_partitions: bool):
    return zero3_engine(CASES[CASE][0], layers=2, lr=1e-2, one_rank_partitions=one_rank_partitions)[0]


def train(engine, data, steps: int) -> list[float]:
    losses = []
    for i in range(steps):
        with step_gather(engine, GATHERED):
            loss = engine(data[i % len(data)])["total"]
            engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def weights(engine) -> dict:
    with step_gather(engine, GATHERED):
        return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


if __name__ == "__main__":
    out, checkpoints = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    init_distributed()
    data = batches(*CASES[CASE])
    result = {}
    for path, flag in (("partitions", True), ("deepspeed", False)):
        engine = engine_of(flag)
        first = train(engine, data, 3)
        engine.save_checkpoint(f"{checkpoints}/{path}", tag="step3")
        result[path] = {"losses": first + train(engine, data, 2), "weights": weights(engine)}
    for path, flag, source in (("partitions_resumed", True, "deepspeed"), ("deepspeed_resumed", False, "partitions")):
        engine = engine_of(flag)
        engine.load_checkpoint(f"{checkpoints}/{source}", tag="step3")
        result[path] = {"losses": train(engine, data, 2), "weights": weights(engine)}
    torch.save(result, out)
    teardown()
