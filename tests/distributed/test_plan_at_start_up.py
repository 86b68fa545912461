"""The trainer runs the memory plan at start-up: it picks the gather policy, and a run that does
not fit stops before any weight is allocated."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.distributed.conftest import losses_by_step, torchrun

pytestmark = pytest.mark.distributed
COMMON = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "train.micro_batch_size=8",
          "train.log_every=1", "train.validate=false"]


def test_a_run_that_does_not_fit_exits_3_with_the_plan_and_what_to_change(tiny_shards, tmp_path):
    # 16k hidden x 64 layers: about 206B parameters, sized on the meta device only
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "configs/tiny-cpu.yaml",
                           f"data={tiny_shards}", f"runs_dir={tmp_path}", "name=huge", "model.tiny.hidden_size=16384",
                           "model.tiny.num_layers=64", "model.tiny.intermediate_size=65536"],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "DOES NOT FIT" in done.stdout and "error: does not fit:" in done.stderr
    assert "train.memory_plan=warn" in done.stderr
    assert not (tmp_path / "huge" / "checkpoints").exists()


def test_gradients_reduced_after_backward_are_refused_where_the_model_is_not_gathered(tiny_shards, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "configs/tiny-cpu.yaml",
                           f"data={tiny_shards}", f"runs_dir={tmp_path}", "name=refused", *COMMON,
                           "train.zero3_gather=streamed", "train.grad_reduce=after_backward"],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert ("train.grad_reduce=after_backward goes with ZeRO-3's gathered policy, not streamed" in done.stderr
            and "set train.grad_reduce=overlapped" in done.stderr)


def test_a_compiled_forward_is_refused_where_zero3_parameters_are_not_gathered(tiny_shards, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", "configs/tiny-cpu.yaml",
                           f"data={tiny_shards}", f"runs_dir={tmp_path}", "name=refused", *COMMON,
                           "method.name=coconut", "train.zero3_gather=streamed", "model.body_forward=compiled"],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert ("model.body_forward=compiled needs ZeRO-3's gathered policy (this run: streamed)" in done.stderr
            and "set model.body_forward=lean" in done.stderr)


def test_a_streamed_latent_run_bounds_zero3_live_parameters_and_trains(tiny_shards, tmp_path):
    code, out = torchrun(["--config", "configs/tiny-cpu.yaml", f"data={tiny_shards}", f"runs_dir={tmp_path}",
                          "name=streamed", *COMMON, "method.name=codi", "method.simcot=true", "method.num_latent=2",
                          "train.max_steps=3", "train.zero3_gather=streamed"])
    assert code == 0, out[-3000:]
    # the plan picked gathered with gradients reduced after backward; streamed keeps DeepSpeed's hooks
    assert "ZeRO-3 parameters: streamed (train.zero3_gather); gradients reduced overlapped (memory plan)" in out
    zero = json.loads((tmp_path / "streamed" / "ds_config.json").read_text())["zero_optimization"]
    assert zero["stage3_max_live_parameters"] < 10**9 and zero["stage3_max_reuse_distance"] < 10**9
    assert sorted(losses_by_step(tmp_path / "streamed")) == [1, 2, 3]

