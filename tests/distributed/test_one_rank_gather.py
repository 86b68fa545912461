"""On a partition group of one rank the gathered policy points each parameter at its partition (no
gather, no copy): losses and weights are bit-identical to DeepSpeed's own gather, through a
checkpoint saved and resumed either way."""
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.distributed


def test_one_ranks_partitions_as_parameters_train_and_resume_as_deepspeeds_gather(tmp_path):
    out = tmp_path / "result.pt"
    done = subprocess.run([sys.executable, "-m", "tests.distributed.one_rank_gather", str(out), str(tmp_path / "ckpt")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    ours, deepspeeds = result["partitions"], result["deepspeed"]
    assert ours["losses"] == deepspeeds["losses"] and len(set(ours["losses"])) == 5      # it trains
    for resumed in ("partitions_resumed", "deepspeed_resumed"):
        assert result[resumed]["losses"] == deepspeeds["losses"][3:], resumed
    for name, weight in deepspeeds["weights"].items():
        assert weight.numel() > 0
        for other in (ours, result["partitions_resumed"], result["deepspeed_resumed"]):
            assert torch.equal(other["weights"][name], weight), name
