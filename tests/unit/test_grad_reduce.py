"""The buckets ``after_backward`` reduce-scatters: consecutive, in order, none above the bucket size
unless one parameter alone is (the end-to-end equality with DeepSpeed's hooks is in
tests/distributed/test_gather_policy.py and test_train_zero3.py)."""
from types import SimpleNamespace

import pytest

from pipeline.engine.grad_reduce import apply_grad_reduce, buckets

pytestmark = pytest.mark.unit


def _params(*sizes):
    return [SimpleNamespace(ds_numel=n, name=i) for i, n in enumerate(sizes)]


def test_buckets_keep_the_order_and_the_size_bound_and_a_large_parameter_goes_alone():
    params = _params(3, 4, 2, 10, 1, 1, 5)
    out = buckets(params, size=7)
    assert [[p.name for p in b] for b in out] == [[0, 1], [2], [3], [4, 5, 6]]
    assert [p for b in out for p in b] == params
    assert buckets([], 7) == []
    assert len(buckets(params, size=10**9)) == 1


def test_an_unknown_mode_and_an_optimizer_without_zero3_internals_are_refused():
    engine = SimpleNamespace(optimizer=SimpleNamespace())
    with pytest.raises(ValueError, match="expected one of overlapped, after_backward"):
        apply_grad_reduce(engine, "once")
    apply_grad_reduce(engine, "overlapped")                 # DeepSpeed's own way: nothing to change
    with pytest.raises(RuntimeError, match="which train.grad_reduce=after_backward .*needs"):
        apply_grad_reduce(engine, "after_backward")
