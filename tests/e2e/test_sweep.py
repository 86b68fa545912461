"""The toy latent-scaling sweep end to end on a tiny budget (``make sweep`` runs the same code)."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e
TINY = ["--points", "1", "--cot-steps", "4", "--stage-steps", "2", "--final-steps", "2", "--eval-limit", "8",
        "--train", "300"]


def _sweep(out, *extra):
    return subprocess.run([sys.executable, "-m", "experiments.sweep", "--out", str(out), *TINY, *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def test_sweep_trains_evaluates_and_reports_every_point_then_resumes(tmp_path):
    result = _sweep(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for method in ("coconut", "simcot"):
        (point,) = results["points"][method]
        assert point["n_latents"] == 2 and point["steps"] == 2 and point["n"] == 8
        assert point["geometry"]["inter_latent_l2"] > 0 and point["geometry"]["to_vocab_centre_l2"] > 0
        assert [row["stage"] for row in results["chains"][method]] == [1]
    assert results["references"]["cot"]["steps"] == 4 and results["references"]["nocot"]["n"] == 8
    table = (tmp_path / "results.md").read_text()
    for row in ("| Coconut | 1 | 2 |", "| Coconut + SIM-CoT | 1 | 2 |", "| CoT | - | 0 |", "| No-CoT | - | 0 |"):
        assert row in table
    for png in ("accuracy_vs_latents.png", "geometry_vs_latents.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Latent geometry" in (tmp_path / "simcot-1" / "eval" / "report.md").read_text()
    log = (tmp_path / "logs" / "train-simcot-1.log").read_text()
    assert f"initialised weights from {tmp_path / 'simcot-chain' / 'checkpoints' / 'epoch0'}" in log
    again = _sweep(tmp_path)
    assert again.returncode == 0 and "resuming: 10 of 10 jobs already done" in again.stdout, again.stdout[-2000:]
    longer = _sweep(tmp_path, "--final-steps", "3")             # only the finals and their evals rerun
    assert longer.returncode == 0 and "resuming: 6 of 10 jobs already done" in longer.stdout, longer.stdout[-2000:]
    assert [p["steps"] for p in json.loads((tmp_path / "results.json").read_text())["points"]["simcot"]] == [3]
    other_data = _sweep(tmp_path, "--train", "301")
    assert other_data.returncode != 0 and "train: 300 -> 301" in other_data.stderr
