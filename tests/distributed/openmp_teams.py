"""Run by tests/distributed/test_openmp_teams.py: a training process at 2 threads (its own process,
as ``python -m pipeline.train`` is), after a few training steps -> JSON on the last line: its threads
by name, the work threads its gloo process groups own, and the main thread's voluntary context
switches over plain parallel steps before the engine was built and after it trained.

    python -m tests.distributed.openmp_teams SHARDS RUNS_DIR
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter

import torch


def thread_names() -> Counter:
    """Threads by name (``/proc/self/task``): an OpenMP worker carries the name of the thread whose
    team it belongs to."""
    names = Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8") as handle:
                names[handle.read().strip()] += 1
        except FileNotFoundError:       # ended meanwhile
            continue
    return names


def sleeps_in_plain_steps(steps: int = 30) -> int:
    """The main thread's voluntary context switches over ``steps`` parallel steps: an OpenMP worker
    that sleeps at a barrier instead of spinning makes the main thread wait on it."""
    def switches() -> int:
        with open(f"/proc/self/task/{os.getpid()}/status", encoding="utf-8") as handle:
            return int(next(line for line in handle if line.startswith("voluntary_ctxt_switches")).split()[1])
    x = torch.randn(256, 256)
    start = switches()
    for _ in range(steps):
        for _ in range(20):
            x = torch.tanh(x @ x * 1e-2) + x * 0.5
    return switches() - start


def gloo_work_threads() -> int:
    from torch.distributed import distributed_c10d

    return sum(pg._get_backend(torch.device("cpu")).options._threads for pg in distributed_c10d._world.pg_map)


def main(shards: str, runs: str) -> None:
    torch.set_num_threads(2)
    before = sleeps_in_plain_steps()
    from pipeline.engine.config import load_config
    from pipeline.engine.distributed import teardown
    from pipeline.engine.trainer import Trainer

    run = load_config("configs/tiny-cpu.yaml", [f"data={shards}", f"runs_dir={runs}", "name=omp", "train.max_steps=3",
                                                "train.validate=false", "model.tiny.hidden_size=64",
                                                "model.tiny.intermediate_size=128"])
    Trainer(run).fit()
    after = sleeps_in_plain_steps()
    print(json.dumps({"threads": torch.get_num_threads(), "names": thread_names(), "gloo_work_threads":
                      gloo_work_threads(), "sleeps_before": before, "sleeps_after": after}))
    teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
