"""A method added through the registry alone (pipeline/latent/methods/pause.py) runs every stage:
ZeRO-3 training through the real CLI, merge, and evaluation with its own prompt."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.distributed.conftest import losses_by_step, torchrun

pytestmark = pytest.mark.distributed


def test_pause_tokens_train_merge_and_evaluate(tiny_shards, tmp_path):
    code, out = torchrun(["--config", "configs/tiny-cpu.yaml", f"data={tiny_shards}", f"runs_dir={tmp_path}",
                          "name=pause", "method.name=pause", "method.num_latent=3", "model.tiny.hidden_size=64",
                          "model.tiny.intermediate_size=128", "train.micro_batch_size=8", "train.max_steps=12",
                          "train.log_every=1", "train.validate=false"], nproc=1)
    assert code == 0, out[-3000:]
    losses = losses_by_step(tmp_path / "pause")
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1]
    for args in (["pipeline.merge", "--run", str(tmp_path / "pause")],
                 ["pipeline.evaluate", "--model", str(tmp_path / "pause" / "merged"), "--set", f"synth={tiny_shards}",
                  "--split", "valid", "--limit", "6", "--max-new-tokens", "6", "--out", str(tmp_path / "eval")]):
        result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["latent_config"]["method"] == "pause" and report["latent_config"]["n_latents"] == 3
    synth = report["sets"]["synth"]
    assert synth["n"] == 6 and synth["mean_tokens"] >= 3
    assert report["latents"] == []          # nothing is filled, so there is nothing to decode
