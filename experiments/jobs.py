"""Run a small graph of shell-free jobs in a few parallel lanes, resumably.

    from experiments.jobs import Job, run_jobs
    run_jobs([Job("a", [[python, "-m", ...]]), Job("b", [...], after=["a"])], out_dir, lanes=2, threads=1)

Each job is a list of commands run one after another; its output goes to ``out/logs/NAME.log``.
A finished job leaves ``out/done/NAME.json`` (commands, seconds). On the next call it is skipped
if it would run the same commands and every job it comes after was skipped too; any other job
first deletes its ``clean`` paths and runs from scratch. So an interrupted sweep resumes where it
stopped, and a sweep re-run with other settings redoes exactly the jobs they change. On a shared
2-core box, lanes of one thread each beat one lane of two threads (measured: OpenMP
threads wait on each other), so each job gets ``OMP_NUM_THREADS=threads``. The first failure
stops new jobs, waits for the running ones, and raises naming the job and its log.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field


@dataclass
class Job:
    name: str
    commands: list[list[str]]
    after: list[str] = field(default_factory=list)
    clean: list[str] = field(default_factory=list)     # deleted before the job (re)starts


class JobFailed(RuntimeError):
    pass


def record_path(out: str, name: str) -> str:
    return os.path.join(out, "done", f"{name}.json")


def log_path(out: str, name: str) -> str:
    return os.path.join(out, "logs", f"{name}.log")


def done_record(out: str, name: str) -> dict | None:
    path = record_path(out, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def still_done(jobs: list[Job], out: str) -> set[str]:
    """Jobs whose record matches their commands and whose ``after`` jobs are all still done."""
    matching = {j.name for j in jobs if (done_record(out, j.name) or {}).get("commands") == j.commands}
    kept: set[str] = set()
    changed = True
    while changed:               # a job counts once everything it comes after counts (any list order)
        changed = False
        for job in jobs:
            if job.name in matching and job.name not in kept and set(job.after) <= kept:
                kept.add(job.name)
                changed = True
    return kept


class _Running:
    def __init__(self, job: Job, out: str, env: dict, cwd: str):
        self.job, self.out, self.env, self.cwd = job, out, env, cwd
        self.start = time.perf_counter()
        self.log = open(log_path(out, job.name), "w", encoding="utf-8")
        self.remaining = list(job.commands)
        self.process = self._next()

    def _next(self) -> subprocess.Popen:
        command = self.remaining.pop(0)
        self.log.write("$ " + " ".join(command) + "\n")
        self.log.flush()
        return subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)

    def poll(self) -> int | None:
        """None while running; else the exit code of the job (0 once every command succeeded)."""
        code = self.process.poll()
        if code is None:
            return None
        if code == 0 and self.remaining:
            self.process = self._next()
            return None
        self.log.close()
        if code == 0:
            seconds = time.perf_counter() - self.start
            with open(record_path(self.out, self.job.name), "w", encoding="utf-8") as handle:
                json.dump({"seconds": seconds, "commands": self.job.commands}, handle, indent=1)
        return code


def _forget(job: Job, out: str) -> None:
    """A job about to run starts from scratch: its ``clean`` paths and any stale record go."""
    for path in job.clean:
        shutil.rmtree(path, ignore_errors=True)
    record = record_path(out, job.name)
    if os.path.exists(record):
        os.remove(record)


def run_jobs(jobs: list[Job], out: str, lanes: int, threads: int, cwd: str, say=print,
             env: dict | None = None) -> None:
    """Run every job not yet done, in list order as their ``after`` jobs finish; ``env`` is added
    to this process's environment."""
    for sub in ("logs", "done"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads)}
    finished = still_done(jobs, out)
    pending = [j for j in jobs if j.name not in finished]
    if finished:
        say(f"resuming: {len(finished)} of {len(jobs)} jobs already done ({out}/done)")
    for job in pending:
        _forget(job, out)
    running: list[_Running] = []
    failure = None
    while pending or running:
        ready = [j for j in pending if set(j.after) <= finished] if failure is None else []
        while ready and len(running) < lanes:
            job = ready.pop(0)
            pending.remove(job)
            say(f"[{len(finished) + len(running) + 1}/{len(jobs)}] {job.name} (log: {log_path(out, job.name)})")
            running.append(_Running(job, out, env, cwd))
        time.sleep(0.5)
        for item in list(running):
            code = item.poll()
            if code is None:
                continue
            running.remove(item)
            if code:
                failure = failure or f"job {item.job.name} failed (exit {code}); see {log_path(out, item.job.name)}"
            else:
                finished.add(item.job.name)
                say(f"    {item.job.name} done in {time.perf_counter() - item.start:.0f}s")
        if failure is None and pending and not running and not any(set(j.after) <= finished for j in pending):
            failure = f"jobs {[j.name for j in pending]} wait on jobs that are not in the list"
        if failure and not running:
            raise JobFailed(failure)
