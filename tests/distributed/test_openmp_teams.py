"""A training process holds one OpenMP team, its main thread's: gloo's work threads run their
collectives' copies on one thread (pipeline/engine/threads.py), so the main thread's workers keep
spinning at their barriers."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.distributed


def test_a_training_process_starts_no_openmp_team_beyond_its_own(tiny_shards, tmp_path):
    result = subprocess.run([sys.executable, "-m", "tests.distributed.openmp_teams", str(tiny_shards), str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["threads"] == 2                                  # the main thread keeps its count
    # every thread named after gloo's work threads is one of them: none is an OpenMP worker of theirs
    assert report["names"]["pt_gloo_runloop"] == report["gloo_work_threads"], report
    # and the main thread's workers still spin rather than sleep at their barriers
    assert report["sleeps_after"] <= 3 * report["sleeps_before"] + 100, report
