"""The embedded default's path end to end on a tiny budget (``make demo`` runs the same code)."""
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_demo_runs_every_stage_and_reports_measured_numbers(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.demo", "--out", str(tmp_path), "--train", "300",
                             "--cot-steps", "6", "--latent-steps", "3"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert stage in out
    assert "initialised base weights from" in out
    table = [line for line in out.splitlines() if line.startswith("| cot |") or line.startswith("| coconut-simcot |")]
    assert len(table) == 2 and "| 6 |" in table[0] and "| 3 |" in table[1]
    assert (tmp_path / "data" / "shards" / "manifest.json").exists()
    assert (tmp_path / "coconut-simcot" / "checkpoints" / "latest").read_text() == "epoch0"
