"""Jacobi latent updates through every stage: 2-rank ZeRO-3 CODI + SIM-CoT with checkpointing
through the iterations, merge, and evaluation that fills latents the way training did."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.distributed.conftest import losses_by_step, torchrun

pytestmark = pytest.mark.distributed


def test_jacobi_codi_simcot_trains_under_zero3_merges_and_evaluates(tiny_shards, tmp_path):
    code, out = torchrun(["--config", "configs/tiny-cpu.yaml", f"data={tiny_shards}", f"runs_dir={tmp_path}",
                          "name=jacobi", "method.name=codi", "method.simcot=true", "method.num_latent=3",
                          "method.latent_update=jacobi", "method.jacobi_iterations=2",
                          "model.gradient_checkpointing=true", "model.tiny.hidden_size=64",
                          "model.tiny.intermediate_size=128", "train.micro_batch_size=8", "train.max_steps=10",
                          "train.log_every=1", "train.validate=false"])
    assert code == 0, out[-3000:]
    run = tmp_path / "jacobi"
    losses, steps = losses_by_step(run), losses_by_step(run, "loss/step_ce")
    assert sorted(losses) == list(range(1, 11)) and losses[10] < losses[1] and steps[10] < steps[1]
    for args in (["pipeline.merge", "--run", str(run)],
                 ["pipeline.evaluate", "--model", str(run / "merged"), "--set", f"synth={tiny_shards}",
                  "--split", "valid", "--limit", "6", "--max-new-tokens", "6", "--decode-latents", "2",
                  "--out", str(tmp_path / "eval")]):
        result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    latent = report["latent_config"]
    method = latent["method_config"]
    assert method["latent_update"] == "jacobi" and method["jacobi_iterations"] == 2 and latent["n_latents"] == 3
    assert report["sets"]["synth"]["n"] == 6
    assert len(report["latents"]) == 2 and all(len(p["decoded_steps"]) == 3 for p in report["latents"])
