"""A throw-away Slurm cluster on loopback: slurmctld + N slurmd ("nodes") in a temp dir.

auth/none, proctrack/linuxproc, every file under the temp
dir, every listener on 127.0.0.1, each daemon in its own mount namespace with a private
/etc/hosts (so ``node1`` resolves, as on a real cluster) and a private /dev/shm. Processes are
only ever stopped by PID: the daemons we started, plus any process whose environment carries
this cluster's ``SLURM_CONF`` (strays from jobs).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}
# The requeue revokes the job's credential on each node at a one-second resolution, and slurmd
# refuses a launch whose credential is not strictly newer ("Job 5 already killed, do not launch
# batch job"; the job then ends FAILED with no output). Slurm's own hold of about two minutes
# avoids that; releasing the job in the same second as the requeue failed 3 of 6 times.
REQUEUE_HOLD_S = 2.0


def unavailable_reason() -> str | None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [b for b in BINARIES if shutil.which(b, path=path) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; .ci/run installs slurmctld slurmd slurm-client)"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (daemons run as root with auth/none)"
    if subprocess.run(["unshare", "--mount", "--uts", "true"], capture_output=True).returncode:
        return "unshare --mount --uts is not permitted here"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


class LocalSlurm:
    def __init__(self, root: Path, n_nodes: int = 2, cpus_per_node: int = 2):
        self.root, self.nodes = Path(root), [f"node{i + 1}" for i in range(n_nodes)]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
        self.daemons: list[subprocess.Popen] = []
        self.cpus = cpus_per_node

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30) -> LocalSlurm:
        for sub in ("state", "log", "run", "jobs", *[f"spool/{n}" for n in self.nodes]):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ports = [_free_port() for _ in range(len(self.nodes) + 1)]
        self.conf.write_text(self._config(ports))
        hosts = self.root / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + "".join(f"127.0.0.1 {n}\n" for n in self.nodes))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)], hosts, None)
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)], hosts, node)
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({proc.args}); logs in {self.root / 'log'}")
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
            if states.count("idle") == len(self.nodes):
                return self
            time.sleep(0.2)
        raise TimeoutError(f"Slurm nodes not idle after {timeout}s; logs in {self.root / 'log'}")

    def _spawn(self, name: str, command: list[str], hosts: Path, node: str | None) -> None:
        # Private /etc/hosts (node names resolve) and, per node, its own hostname and /dev/shm.
        setup = 'mount --bind "$0" /etc/hosts'
        if node:
            setup += f" && hostname {node} && mount -t tmpfs -o size=512m,mode=1777 tmpfs /dev/shm"
        wrapper = ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
                   f'{setup} && shift && exec "$@"', str(hosts), "--", *command]
        log = open(self.root / "log" / f"{name}.out", "w")
        self.daemons.append(subprocess.Popen(wrapper, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, preexec_fn=_die_with_parent))

    def _config(self, ports: list[int]) -> str:
        r = self.root
        lines = [
            "ClusterName=testcluster", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ports[0]}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/none", "CredType=cred/none",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny", f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n", f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid", f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log", "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0", "MpiDefault=none", "ReturnToService=2", "MailProg=/bin/true",
            "SlurmdParameters=config_overrides", "KillWait=60", "JobRequeue=1",
        ]
        for node, port in zip(self.nodes, ports[1:]):
            lines.append(f"NodeName={node} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory=8000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        self.run("scancel", "--full", "--partition", "debug")
        self._wait(lambda: not self.run("squeue", "-h").stdout.strip(), 10)
        for proc in self.daemons:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.daemons:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        strays = self.stray_pids()
        for pid in strays:
            _signal(pid, signal.SIGTERM)
        self._wait(lambda: not self.stray_pids(), 5)
        for pid in self.stray_pids():
            _signal(pid, signal.SIGKILL)

    def stray_pids(self) -> list[int]:
        """Live processes started under this cluster (jobs, steps, tasks): by environment, never by name."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in environ.split(b"\0") and state != "Z":
                found.append(int(entry))
        return found

    def daemon_errors(self, last: int = 20) -> str:
        """The daemons' latest error lines, without the ones every start prints."""
        harmless = ("pmix", "state file", "state save file", "hwloc", "Node configuration differs")
        lines = [f"{log.name}: {line}" for log in sorted((self.root / "log").glob("*.log"))
                 for line in log.read_text(errors="replace").splitlines()
                 if "error" in line and not any(h in line for h in harmless)]
        return "\n".join(lines[-last:])

    # ------------------------------------------------------------------ jobs
    def run(self, *command: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job(self, job_id: str) -> dict:
        line = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, timeout: float, final: set[str] = FINAL) -> dict:
        """Poll until a final state. Slurm holds a requeued batch job for about two minutes
        (Reason=BeginTime); this test cluster releases it after REQUEUE_HOLD_S instead."""
        deadline, held_since = time.time() + timeout, None
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in final:
                return info
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                held_since = held_since or time.time()
                if time.time() - held_since >= REQUEUE_HOLD_S:
                    self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            time.sleep(0.5)
        self.run("scancel", job_id)
        raise TimeoutError(f"job {job_id} not done after {timeout}s: {self.job(job_id)}")

    @staticmethod
    def _wait(condition, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return True
            time.sleep(0.1)
        return False


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
