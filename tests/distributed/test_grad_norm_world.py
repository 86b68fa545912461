"""The foreach gradient norm reads a partition group of None as DeepSpeed does, as the world: on 2
ranks it sums both ranks' partitions and equals DeepSpeed's own norm (tests/distributed/grad_norm_world.py)."""
import pytest
import torch

from tests.distributed.conftest import torchrun

pytestmark = pytest.mark.distributed


def test_a_partition_group_of_none_is_the_world(tmp_path):
    out = tmp_path / "norms.pt"
    code, output = torchrun([str(out)], module="tests.distributed.grad_norm_world", timeout=120)
    assert code == 0, output[-3000:]
    norms = torch.load(out, weights_only=True)
    assert torch.equal(norms["ours"].double(), norms["deepspeed"].double())
    assert norms["ours"].item() > norms["rank0_alone"].item() * 1.2      # both ranks' gradients counted
