"""Every frozen run (tests/frozen_runs/*/, each a run directory saved by the code of its day) still
works with today's code: merged without its shards to the weights it was merged to then, its
merged model evaluated, resumed where it stopped, and used as ``checkpoint.init_from``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.engine import checkpoint
from tests.conftest import REPO
from tests.distributed.conftest import torchrun

pytestmark = pytest.mark.distributed
FROZEN = sorted(p.parent.parent for p in (REPO / "tests" / "frozen_runs").glob("*/run/config.yaml"))


def _run(*args: str, cwd: Path = REPO) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}        # the code from here, run from another folder
    result = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(params=FROZEN, ids=[p.name for p in FROZEN])
def frozen(request, tmp_path) -> Path:
    """A copy (the committed one stays as it was written)."""
    shutil.copytree(request.param, tmp_path / request.param.name)
    return tmp_path / request.param.name


def test_there_is_a_frozen_run():
    assert FROZEN, "tests/frozen_runs/ holds no run: python -m tests.frozen_runs.make_frozen_run makes one"


def test_a_frozen_run_merges_without_its_shards_to_the_same_weights(frozen, tmp_path):
    shutil.move(frozen / "shards", tmp_path / "elsewhere")          # only the run directory is left
    out = tmp_path / "merged"
    _run("pipeline.merge", "--run", str(frozen / "run"), "--out", str(out), cwd=tmp_path)
    then = frozen / "run" / "merged"
    files = sorted(p.relative_to(then) for p in then.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(out) for p in out.rglob("*.safetensors"))
    for name in files:
        want, got = load_file(then / name), load_file(out / name)
        assert sorted(want) == sorted(got) and all(want[k].equal(got[k]) for k in want), name
    latent = json.loads((out / "latent_config.json").read_text())
    assert latent["schema_version"] == 2 and latent["source"]["tag"] == json.loads(
        (then / "latent_config.json").read_text())["source"]["tag"]


def test_a_frozen_runs_merged_model_is_evaluated(frozen, tmp_path):
    out = tmp_path / "eval"
    _run("pipeline.evaluate", "--model", str(frozen / "run" / "merged"), "--set", f"synth={frozen / 'shards'}",
         "--split", "valid", "--limit", "6", "--max-new-tokens", "6", "--decode-latents", "1", "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    assert report["sets"]["synth"]["n"] == 6 and report["latent_config"]["n_latents"] >= 1


def test_a_frozen_run_resumes_and_starts_another(frozen):
    config, checkpoints = frozen / "run" / "config.yaml", frozen / "run" / "checkpoints"
    code, log = torchrun(["--config", str(config), f"data={frozen / 'shards'}", f"runs_dir={frozen}",
                          "train.epochs=2", "train.max_steps=6", "checkpoint.every_steps=2"], nproc=1)
    assert code == 0, log[-3000:]
    assert "resumed from" in log and "step 4" in log
    assert (checkpoints / "step6" / "COMPLETE.json").exists()
    code, log = torchrun(["--config", str(config), f"data={frozen / 'shards'}", f"runs_dir={frozen}", "name=child",
                          f"checkpoint.init_from={checkpoints}", "train.max_steps=1"], nproc=1)
    assert code == 0, log[-3000:]
    latest = checkpoint.latest_tag(str(checkpoints))
    assert checkpoint.client_state(str(checkpoints), latest)["global_step"] == 6
    assert f"initialised weights from {checkpoints}/{latest}" in log
