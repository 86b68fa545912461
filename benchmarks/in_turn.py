"""Two sides of a benchmark, each in a clean process of its own, timed in turn.

    sides = {"zero3": Side("benchmarks.overhead", "zero3_side", {"case": "cot", "layers": 2}),
             "plain": Side("benchmarks.overhead", "plain_side", {"case": "cot", "layers": 2})}
    times = in_turn(sides, threads=1, warmup=5, steps=20, chunk=5)     # {"zero3": [s, ...], "plain": [...]}

Each side runs in a fresh interpreter, so what one side does to its process (DeepSpeed's threads and
hooks, OpenMP teams, allocator state) cannot slow the other. Both are built before either is timed;
then each runs its warm-up steps, and after that ``chunk`` steps at a time in turn, so a slow spell of
a shared machine lands on both. A side is a function ``side(pace, **kwargs)``: it builds what it
times, calls ``pace.start()``, then runs steps for ever, calling ``pace(seconds)`` after each (or
:func:`timed_forever`); ``pace`` returns while the coordinator wants more and raises :class:`Stop`
when it is done.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Side:
    module: str                              # where the side function lives
    function: str
    kwargs: dict = field(default_factory=dict)


class Stop(Exception):
    """The coordinator wants no more steps."""


class Pace:
    """A side's link to the coordinator: commands (steps wanted) on stdin, step times on ``results``."""

    def __init__(self, results):
        self.results, self.left, self.times = results, 0, []

    def _send(self, message) -> None:
        self.results.write(json.dumps(message) + "\n")
        self.results.flush()

    def _wait(self) -> None:
        line = sys.stdin.readline()
        self.left = int(line) if line.strip() else 0
        if self.left <= 0:
            raise Stop

    def start(self) -> None:
        """Built: wait for the first steps to run."""
        self._send("ready")
        self._wait()

    def __call__(self, seconds: float) -> None:
        self.times.append(seconds)
        self.left -= 1
        if self.left == 0:
            self._send(self.times)
            self.times = []
            self._wait()


def timed_forever(step: Callable, inputs: list, pace: Pace) -> None:
    """``step(inputs[i % len(inputs)])`` for ever, each timed and handed to ``pace``."""
    pace.start()
    i = 0
    while True:
        start = time.perf_counter()
        step(inputs[i % len(inputs)])
        pace(time.perf_counter() - start)
        i += 1


class Worker:
    """One side's process: started at once, built in parallel with the other side."""

    def __init__(self, name: str, side: Side, threads: int):
        self.name = name
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"in_turn-{name}-", suffix=".log")
        read, write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.in_turn", side.module, side.function, json.dumps(side.kwargs),
             str(threads), str(write)], stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT, text=True,
            pass_fds=(write,), cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        os.close(write)
        self.results = os.fdopen(read)

    def receive(self):
        line = self.results.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"benchmark side {self.name!r} ended (exit {self.process.wait()}):\n"
                               f"{self.log.read()[-4000:]}")
        return json.loads(line)

    def run(self, steps: int) -> list[float]:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        return self.receive()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("0\n")
            self.process.stdin.close()
            self.process.wait(timeout=120)
        self.log.close()


def in_turn(sides: dict[str, Side], threads: int, warmup: int, steps: int, chunk: int) -> dict[str, list[float]]:
    """Each side's ``steps`` timed step durations (seconds) after ``warmup``, in clean processes,
    ``chunk`` steps at a time in turn. ``threads``: torch's intra-op threads in each (0: its default)."""
    workers = [Worker(name, side, threads) for name, side in sides.items()]
    times = {name: [] for name in sides}
    try:
        for worker in workers:
            if worker.receive() != "ready":
                raise RuntimeError(f"benchmark side {worker.name!r} did not start")
        for worker in workers:
            worker.run(warmup)
        for round_ in range(-(-steps // chunk)):
            n = min(chunk, steps - round_ * chunk)
            for worker in workers if round_ % 2 == 0 else workers[::-1]:      # either side first, in turn
                times[worker.name] += worker.run(n)
    finally:
        for worker in workers:
            worker.stop()
    return times


def _worker(argv: list[str]) -> int:
    module, function, kwargs, threads, fd = argv
    import torch

    if int(threads):
        torch.set_num_threads(int(threads))
    side = getattr(importlib.import_module(module), function)
    with os.fdopen(int(fd), "w") as results, contextlib.suppress(Stop):
        side(Pace(results), **json.loads(kwargs))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
