"""Helpers for multi-rank tests: torchrun subprocesses that never outlive a test."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300, env: dict | None = None,
             on_line=None, module: str = "pipeline.train") -> tuple[int, str]:
    """Run ``module`` (``pipeline.train``) on ``nproc`` CPU ranks; on timeout SIGTERM torchrun (it
    forwards to its workers, which run in their own sessions), then kill. Returns (exit code, output)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", module, *args]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    import threading

    def pump():
        for line in proc.stdout:
            lines.append(line)
            if on_line:
                on_line(line, proc)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        pytest.fail(f"torchrun timed out after {timeout}s:\n{''.join(lines)[-3000:]}")
    reader.join(timeout=5)
    return proc.returncode, "".join(lines)


def losses_by_step(run_dir: Path, key: str = "loss/total") -> dict[int, float]:
    """The last logged value per step (a resumed run logs its replayed steps again)."""
    values = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            values[row["step"]] = row[key]
    return values
