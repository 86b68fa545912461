"""The embedded default's path end to end on a tiny budget (``make demo`` runs the same code)."""
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_demo_runs_every_stage_and_reports_measured_numbers(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.demo", "--out", str(tmp_path), "--train", "300",
                             "--valid", "20", "--cot-steps", "6", "--stage-steps", "1", "--final-steps", "1",
                             "--eval-limit", "8"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in out
    assert "initialised weights from" in out
    table = [line for line in out.splitlines() if line.startswith("| cot |") or line.startswith("| coconut-simcot |")]
    assert len(table) == 2 and "| 6 |" in table[0] and "| 4 |" in table[1] and "% of 8 |" in table[1]
    assert (tmp_path / "data" / "shards" / "manifest.json").exists()
    assert (tmp_path / "coconut-simcot" / "checkpoints" / "latest").read_text() == "epoch3"    # 3 stages + 1 all-latent
    for run in ("cot", "coconut-simcot"):
        assert (tmp_path / run / "merged" / "latent_config.json").exists()
        assert (tmp_path / run / "eval" / "report.md").exists() and (tmp_path / run / "eval" / "accuracy.png").exists()
