"""launch.sh against a real Slurm (two emulated nodes on loopback): train, preemption and
requeue, a killed rank, then merge and eval jobs. Each test is bounded; the fixture sweeps every
process it started by PID."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.distributed.conftest import losses_by_step

pytestmark = pytest.mark.slurm
SMALL = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "train.micro_batch_size=8",
         "train.lr=3e-3", "train.log_every=1", "train.validate=false"]


def submit(slurm, *args) -> str:
    # The two emulated nodes share this machine's 2 cores: one thread per rank, as on a real node
    # with one core per rank. With 2 threads each, oversubscribed MKL picked its thread split at run
    # time and two identical jobs drifted apart at fp32 rounding (seen: 2 of 4 preemption runs).
    env = {**slurm.env, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(REPO / "launch.sh"), "slurm", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def train_job(slurm, shards, runs, name, *extra) -> str:
    return submit(slurm, "train", "--config", "configs/tiny-cpu.yaml", "--nodes", "2", f"data={shards}",
                  f"runs_dir={runs}", f"name={name}", *SMALL, *extra)


def log_of(runs: Path, name: str, job: str) -> str:
    path = runs / name / f"slurm-{job}.out"
    return path.read_text() if path.exists() else ""


def wait_for_line(path_fn, pattern: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if re.search(pattern, path_fn()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{pattern!r} not seen in {timeout}s:\n{path_fn()[-3000:]}")


def test_two_node_training_then_merge_and_eval_jobs(slurm, tiny_shards, tmp_path):
    runs = tmp_path / "runs"
    job = train_job(slurm, tiny_shards, runs, "two", "train.max_steps=4")
    info = slurm.wait(job, 400)
    log = log_of(runs, "two", job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "global batch = 16 (micro 8 x accum 1 x 2 ranks)" in log
    assert {"node1", "node2"} <= set(re.findall(r"rank \d/2 on (node\d)", log))     # ranks on both nodes
    assert (runs / "two" / "checkpoints" / "latest").read_text() == "epoch0"
    script = (runs / "two" / "submit-train.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "srun --kill-on-bad-exit=1" in script

    merge = submit(slurm, "merge", "--name", "two", "--run", str(runs / "two"))
    assert slurm.wait(merge, 200)["JobState"] == "COMPLETED", log_of(runs, "two", merge)[-3000:]
    evaluation = submit(slurm, "eval", "--name", "two", "--model", str(runs / "two" / "merged"),
                        "--set", f"synth={tiny_shards}", "--split", "valid", "--limit", "8", "--max-new-tokens", "8")
    assert slurm.wait(evaluation, 200)["JobState"] == "COMPLETED", log_of(runs, "two", evaluation)[-3000:]
    report = json.loads((runs / "two" / "eval" / "report.json").read_text())
    assert report["sets"]["synth"]["n"] == 8


def test_preemption_signal_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(slurm, tiny_shards, tmp_path):
    runs = tmp_path / "runs"
    # Long enough that the signal always lands mid-run (a tiny step takes ~0.2 s; 12 steps raced).
    steps = ["train.max_steps=60", "train.epochs=10", "checkpoint.every_steps=0"]
    straight = train_job(slurm, tiny_shards, runs, "straight", *steps)
    assert slurm.wait(straight, 400)["JobState"] == "COMPLETED", log_of(runs, "straight", straight)[-3000:]

    job = train_job(slurm, tiny_shards, runs, "preempted", *steps)
    wait_for_line(lambda: log_of(runs, "preempted", job), r"step 4/60", 300)
    slurm.run("scancel", "--signal=USR1", job, check=True)         # what --signal=USR1@120 sends
    info = slurm.wait(job, 500, final={"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = log_of(runs, "preempted", job)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log[-4000:]}\n{slurm.daemon_errors()}"
    assert int(info.get("Restarts", "0")) >= 1
    assert re.search(r"stopped by signal \d+ at step \d+; checkpoint saved", log)
    assert "requeueing job" in log and "resumed from" in log
    a, b = losses_by_step(runs / "straight"), losses_by_step(runs / "preempted")
    assert sorted(b) == list(range(1, 61)) and b[60] == a[60]


def _rank_pid(slurm, rank: str) -> int | None:
    for pid in slurm.stray_pids():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"pipeline.train" in cmd and b"torch.distributed.run" not in cmd:
            return pid
    return None


def test_a_killed_rank_fails_the_job_clearly_and_a_relaunch_resumes(slurm, tiny_shards, tmp_path):
    runs = tmp_path / "runs"
    extra = ["train.max_steps=40", "checkpoint.every_steps=3"]
    job = train_job(slurm, tiny_shards, runs, "killed", *extra)
    wait_for_line(lambda: log_of(runs, "killed", job), r"step 7/40", 300)
    pid = _rank_pid(slurm, "1")
    assert pid, "rank 1's process not found"
    os.kill(pid, signal.SIGKILL)
    info = slurm.wait(job, 200)
    log = log_of(runs, "killed", job)
    assert info["JobState"] in {"FAILED", "CANCELLED"}, log[-3000:]
    assert re.search(r"rank\s*:\s*\d+ \(local_rank: 0\)\s+exitcode\s*:\s*-9", log), log[-3000:]
    ckpt = runs / "killed" / "checkpoints"
    latest = (ckpt / "latest").read_text()
    assert (ckpt / latest / "COMPLETE.json").exists()
    relaunch = train_job(slurm, tiny_shards, runs, "killed", *extra, "train.max_steps=10")
    info = slurm.wait(relaunch, 400)
    relog = log_of(runs, "killed", relaunch)
    assert info["JobState"] == "COMPLETED", relog[-3000:]
    resumed = re.search(r"resumed from (\S+): ", relog).group(1)
    assert resumed.endswith(f"checkpoints/{latest}")           # the last complete one, never a partial save
