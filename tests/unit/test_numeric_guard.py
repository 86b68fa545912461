"""The guard's decisions, step by step (the runs that exercise them: tests/distributed/test_numeric_guard.py)."""
import math

import pytest
import torch

from common.cli import UserError
from pipeline.engine import guard as numeric
from pipeline.engine.config import ConfigError, TrainSettings, load_config
from pipeline.engine.guard import COSINE, NORM_RATIO, GuardState, NumericGuard, StepFacts
from pipeline.engine.progress import Progress


def _guard(**settings) -> NumericGuard:
    return NumericGuard(TrainSettings(**settings), GuardState())


def _step(guard, step, loss, applied=True, stage=0, **metrics):
    return guard.after_step(StepFacts(step, stage, loss, 1.0 if applied else math.inf, applied, metrics))


def test_the_multiplier_keeps_a_finite_loss_bit_for_bit_and_poisons_any_other():
    loss = torch.tensor(3.1415927, requires_grad=True)
    (loss * numeric.keep_or_poison(torch.tensor(7.0, dtype=torch.float64)).float()).backward()
    assert loss.grad.item() == 1.0
    for bad in (math.nan, math.inf, -math.inf):
        assert numeric.keep_or_poison(torch.tensor(bad)).isnan()


def test_bad_steps_are_skipped_until_max_bad_steps_in_a_row():
    guard = _guard(max_bad_steps=2, on_bad="rollback")
    first, = _step(guard, 1, math.nan, applied=False)
    assert (first.action, first.steps) == ("skipped", (1,)) and "loss nan is not finite" in first.message
    assert _step(guard, 2, 1.0) == []                                    # a good step ends the run of them
    assert _step(guard, 3, 1.0, applied=False)[0].action == "skipped"
    streak, = _step(guard, 4, 1.0, applied=False)
    assert (streak.action, streak.steps) == ("rollback", (3, 4)) and "gradient norm inf is not finite" in streak.message
    assert guard.state.bad_total == 3


def test_a_spike_is_measured_against_the_running_mean_of_its_stage():
    guard = _guard(spike_factor=3.0, spike_window=2, on_spike="stop")
    assert _step(guard, 1, 10.0) == [] and _step(guard, 2, 20.0) == []  # the window fills: mean 15
    spike, = _step(guard, 3, 50.0)
    assert spike.action == "stop" and "3.3x its running mean 15" in spike.message and spike.steps == (3,)
    assert guard.state.loss_mean == 15.0                                 # a spike is left out of the mean
    assert _step(guard, 4, 44.0) == []                                   # under 3x
    assert _step(guard, 5, 400.0, stage=1) == []                         # a new stage starts its own mean
    off = _guard(spike_factor=0, spike_window=1)
    assert _step(off, 1, 1.0) == _step(off, 2, 1e9) == []               # 0: not watched


def test_collapse_is_reported_every_patience_logged_steps_while_it_lasts():
    guard = _guard(collapse_cosine=0.9, collapse_norm_ratio=[0.5, 2.0], collapse_patience=2)
    healthy = {COSINE: 0.3, NORM_RATIO: 1.0}
    assert _step(guard, 1, 1.0, **{COSINE: 0.95, NORM_RATIO: 1.0}) == []
    assert _step(guard, 2, 1.0) == []                                    # not a logged step: the run goes on
    found, = _step(guard, 3, 1.0, **{COSINE: 0.3, NORM_RATIO: 3.0})
    assert found.action == "warn" and "norm ratio 3 outside [0.5, 2.0]" in found.message
    assert _step(guard, 4, 1.0, **healthy) == [] and _step(guard, 5, 1.0, **{COSINE: 0.99, NORM_RATIO: 1.0}) == []
    assert len(_step(guard, 6, 1.0, **{COSINE: 0.99, NORM_RATIO: 1.0})) == 1 and guard.state.collapses == 2


@pytest.mark.parametrize("override, message", [
    ("train.max_bad_steps=0", "train.max_bad_steps"), ("train.spike_factor=0.5", "train.spike_factor"),
    ("train.collapse_norm_ratio=[2,1]", "train.collapse_norm_ratio"), ("train.skip_steps=[0]", "train.skip_steps"),
    ("train.on_bad=warn", "on_bad: stop or rollback"), ("train.on_collapse=rollback", "on_collapse: warn or stop")])
def test_settings_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny-cpu.yaml", [override])


def test_deepspeed_settings_that_would_apply_non_finite_steps_are_refused():
    with pytest.raises(UserError, match="compute_grad_norm=false"):
        numeric.check_deepspeed_skips({"zero_optimization": {"compute_grad_norm": False}}, "ds.json")
    with pytest.raises(UserError, match="check_grad_overflow=false"):
        numeric.check_deepspeed_skips({"bf16": {"enabled": True, "check_grad_overflow": False}}, "ds.json")
    numeric.check_deepspeed_skips({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}, "ds.json")


def test_weights_with_a_nan_or_an_inf_are_found():
    layer = torch.nn.Linear(3, 3)
    assert numeric.weights_finite(layer, torch.device("cpu"))
    with torch.no_grad():
        layer.bias[1] = math.inf
    assert not numeric.weights_finite(layer, torch.device("cpu"))


def test_progress_of_a_checkpoint_saved_before_the_guard_existed():
    old = {"epoch": 1, "micro_in_epoch": 0, "global_step": 12, "best_valid": 1.5, "best_tag": "epoch0", "stage": 1}
    progress = Progress.of(old)
    assert progress.global_step == 12 and progress.skipped == [] and progress.guard == GuardState()
    assert Progress.of(progress.as_dict()) == progress
