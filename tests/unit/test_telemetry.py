"""FLOP counting against a hand count, and the per-step meter's means, rates and time metrics."""
import pytest
import torch

from pipeline.engine.telemetry import FlopModel, StepMeter, format_eta, step_flops
from pipeline.latent.batch import Batch

pytestmark = pytest.mark.unit
MODEL = FlopModel(body_params=1000, decoder_body_params=500, layers=2, hidden=8, vocab=10, decoder_prefix=1)


def _batch(**parts):
    return Batch(input_ids=torch.zeros(2, 4, dtype=torch.long), position_ids=torch.zeros(2, 4, dtype=torch.long),
                 attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),                 # 7 tokens, width 4
                 labels=torch.tensor([[-100, -100, 5, 6], [-100, 5, 6, 7]]),                 # 5 labelled
                 teacher_attention_mask=torch.tensor([[1, 1], [1, 0]]),                      # 3 tokens, width 2
                 teacher_labels=torch.tensor([[-100, 4], [4, -100]]),                        # 2 labelled
                 step_ids=torch.zeros(2, 3, 5, dtype=torch.long),                            # 2 x 3 slots x 5
                 step_lengths=torch.tensor([[2, 0, 1], [3, 0, 0]]), **parts)                 # 3 + 2 + 4 labelled


def test_step_flops_is_the_hand_count():
    # 6N per token + 12 * layers * hidden * context, per LM; LM heads 6 * vocab * hidden per labelled token
    base = 7 * (6 * 1000 + 12 * 2 * 8 * 4)
    teacher = 3 * (6 * 1000 + 12 * 2 * 8 * 2)
    decoder = (2 * 3 * (5 + 1)) * (6 * 500 + 12 * 2 * 8 * 6)
    heads = (5 + 2 + (3 + 2 + 4)) * 6 * 10 * 8
    assert step_flops(_batch(), MODEL) == base + teacher + decoder + heads == 223_680


def test_jacobi_iterations_count_every_latent_column_once_more_per_iteration():
    import dataclasses

    jacobi = dataclasses.replace(MODEL, latent_reruns=3)
    batch = _batch(n_latents=2)
    reruns = 3 * 2 * 2 * (6 * 1000 + 12 * 2 * 8 * 4)      # iterations x latents x rows, at the batch's width
    assert step_flops(batch, jacobi) == step_flops(batch, MODEL) + reruns


def test_step_meter_averages_over_micro_batches_and_reports_rates_time_and_memory():
    meter = StepMeter(MODEL, peak=1e9, world=1, device=torch.device("cpu"), warmup=1)
    for total in (2.0, 4.0):
        meter.add({"total": torch.tensor(total, requires_grad=True), "latent_cosine": torch.tensor(0.5)}, _batch())
    assert meter.reduce().item() == 1.0                                  # the step's loss is finite
    metrics = meter.finish(micro_batches=2, steps_left=10)
    assert metrics["loss/total"] == 3.0 and metrics["latent/latent_cosine"] == 0.5
    elapsed = metrics["time/step_s"]
    assert metrics["throughput/tokens_per_s"] == pytest.approx(14 / elapsed)
    assert metrics["mfu(%)"] == pytest.approx(100 * 2 * 223_680 / elapsed / 1e9)
    assert metrics["time/eta_s"] == pytest.approx(10 * elapsed)          # no step timed yet: this one's time
    assert metrics["memory/max_rss(GiB)"] > 0
    meter.add({"total": torch.tensor(1.0)}, _batch())
    meter.reduce()
    second = meter.finish(micro_batches=1, steps_left=4)
    assert second["loss/total"] == 1.0                                   # sums start over each step
    assert second["time/eta_s"] == pytest.approx(4 * second["time/step_s"])   # the warm-up step left out


def test_eta_is_written_in_hours_and_minutes():
    assert format_eta(59) == "0m59s" and format_eta(61) == "1m01s" and format_eta(3 * 3600 + 125) == "3h02m"


def test_a_step_whose_loss_is_not_finite_gets_a_nan_multiplier():
    meter = StepMeter(MODEL, peak=1e9, world=1, device=torch.device("cpu"))
    meter.add({"total": torch.tensor(2.0)}, _batch())
    meter.add({"total": torch.tensor(float("inf"))}, _batch())
    assert meter.reduce().isnan()
