"""grad_norm.foreach_grad_norm: DeepSpeed's gradient-norm arithmetic (each partition's norm in the
norm dtype, their squares summed, the root), bit for bit on a CPU, and -1 (a step to skip) where
it is not finite. Its equality with DeepSpeed's own function on a real engine, one rank and two,
is in tests/distributed (test_gather_policy.py, test_train_zero3.py's resume test)."""
import pytest
import torch

from pipeline.engine.grad_norm import foreach_grad_norm

pytestmark = pytest.mark.unit


def _gradients():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=generator) for n in (4096, 64, 16384, 7, 512)]


def test_the_norm_is_deepspeeds_loop_bit_for_bit_in_the_norm_dtype():
    gradients = _gradients()
    loop = torch.sum(torch.pow(torch.stack([g.to(torch.double).norm(2.0) for g in gradients]), 2.0)) ** 0.5
    norm = foreach_grad_norm(gradients, torch.double, None)
    assert norm.dtype == torch.double and torch.equal(norm, loop)
    assert norm.item() == pytest.approx(torch.cat(gradients).double().norm().item(), rel=1e-12)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_gradient_that_is_not_finite_gives_minus_one(bad):
    gradients = _gradients()
    gradients[2][5] = bad
    assert foreach_grad_norm(gradients, torch.double, None).item() == -1.0
