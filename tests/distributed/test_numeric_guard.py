"""Numerical faults and latent collapse injected into real 2-rank ZeRO-3 runs (tests/distributed/faulty_train.py):
each is skipped, reported, stopped or rolled back as configured, and nothing of a skipped step stays."""
import json

import pytest
import torch

from tests.distributed.conftest import torchrun

pytestmark = pytest.mark.distributed
COMMON = ["--config", "configs/tiny-cpu.yaml", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
          "train.micro_batch_size=8", "train.lr=3e-3", "train.log_every=1", "method.name=codi", "method.simcot=true",
          "method.num_latent=3", "train.grad_accum=2", "train.max_steps=8", "checkpoint.every_steps=2",
          "train.validate=false", "train.spike_window=2"]
# the same faults in every run: a spike (warned), then three bad steps of three kinds on either rank
SPIKE = {"kind": "spike", "step": 4, "factor": 30}
BAD = [{"kind": "nan_loss", "step": 3, "rank": 1}, {"kind": "inf_grad", "step": 5, "rank": 0},
       {"kind": "nan_detached", "step": 6, "rank": 0}]


def _run(tiny_shards, runs, name, *extra, faults=()):
    return torchrun([*COMMON, f"data={tiny_shards}", f"runs_dir={runs}", f"name={name}", *extra],
                    env={"FAULTS": json.dumps(list(faults))}, module="tests.distributed.faulty_train")


def _weights(run_dir) -> dict:
    from pipeline.engine import checkpoint

    ckpt = run_dir / "checkpoints"
    return checkpoint.consolidated(str(ckpt), checkpoint.latest_tag(str(ckpt)))


def _events(run_dir, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == kind]


def _assert_same_weights(run, reference):
    a, b = _weights(run), _weights(reference)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def _assert_checkpoints_finite(run_dir):
    from pipeline.engine import checkpoint

    ckpt = run_dir / "checkpoints"
    for tag in checkpoint.complete_tags(str(ckpt)):
        state = checkpoint.consolidated(str(ckpt), tag)
        assert all(torch.isfinite(v).all() for v in state.values()), tag


@pytest.fixture(scope="module")
def never_saw_them(tiny_shards, tmp_path_factory):
    """The reference of each dtype: the same run, the bad steps' batches never trained on."""
    runs, made = tmp_path_factory.mktemp("guard"), {}

    def reference(dtype: str):
        if dtype not in made:
            code, out = _run(tiny_shards, runs, dtype, "train.skip_steps=[3,5,6]", f"model.dtype={dtype}",
                             faults=[SPIKE])
            assert code == 0, out[-3000:]
            assert "step 5: not trained on (train.skip_steps or a rollback)" in out
            made[dtype] = runs / dtype
        return made[dtype]
    return reference


def test_bad_steps_update_nothing_on_any_rank(tiny_shards, tmp_path, never_saw_them):
    """After-backward reduction (the plan's choice here): NaN loss and gradients on rank 1, an infinite
    gradient of a finite loss on rank 0, a NaN loss whose gradients are finite on rank 0."""
    code, out = _run(tiny_shards, tmp_path, "skips", faults=[SPIKE, *BAD])
    assert code == 0, out[-3000:]
    assert "gradients reduced after backward" in out
    run = tmp_path / "skips"
    _assert_same_weights(run, never_saw_them("fp32"))        # optimizer, schedule and gradients untouched by them
    assert "warning: step 3 (stage 0): loss nan is not finite; no weight updated (1 in a row" in out
    assert "warning: step 5 (stage 0): gradient norm inf is not finite; no weight updated (1 in a row" in out
    assert "warning: step 6 (stage 0): loss nan is not finite; no weight updated (2 in a row" in out
    bad = _events(run, "bad_step")
    assert [(e["step"], e["action"], e["in_a_row"], e["total"]) for e in bad] == [
        (3, "skipped", 1, 1), (5, "skipped", 1, 2), (6, "skipped", 2, 3)]
    assert all(e["epoch"] == 0 and len(e["records"]["0"]) == len(e["records"]["1"]) == 16 for e in bad)
    assert len(set(bad[0]["problem_ids"])) == 32 and bad[0]["step_in_epoch"] == 3
    spike = _events(run, "spike")
    assert [(e["step"], e["action"]) for e in spike] == [(4, "warn")]
    assert spike[0]["loss"] > 20 * spike[0]["running_mean"]
    lr = {r["step"]: r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert lr[5] == lr[6] == lr[4] and lr[3] == lr[2]          # the schedule did not advance on them
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb")).Reload()
    assert {"events/bad_step", "events/spike"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("events/bad_step")] == [1, 2, 3]
    _assert_checkpoints_finite(run)


def test_rollback_reloads_the_last_good_checkpoint_and_leaves_the_batches_out(tiny_shards, tmp_path, never_saw_them):
    """bf16 with DeepSpeed's own gradient reduction (overlapped): step 3 skipped alone, steps 5-6 a streak."""
    code, out = _run(tiny_shards, tmp_path, "rollback", "train.max_bad_steps=2", "train.on_bad=rollback",
                     "train.grad_reduce=overlapped", "model.dtype=bf16", faults=[SPIKE, *BAD])
    assert code == 0, out[-3000:]
    assert "ZeRO-3 | bf16 (fp32 master)" in out
    run = tmp_path / "rollback"
    assert f"rolled back to {run}/checkpoints/step4 (step 4); steps [5, 6] will not be trained on" in out
    assert [(e["step"], e["action"]) for e in _events(run, "bad_step")] == [(3, "skipped"), (5, "skipped"),
                                                                           (6, "rollback")]
    _assert_same_weights(run, never_saw_them("bf16"))
    _assert_checkpoints_finite(run)


def test_a_streak_stops_the_run_which_resumes_from_the_last_good_checkpoint(tiny_shards, tmp_path, never_saw_them):
    code, out = _run(tiny_shards, tmp_path, "stop", "train.max_bad_steps=2", faults=[SPIKE, *BAD])
    run = tmp_path / "stop"
    assert code != 0 and "exitcode  : 4" in out, out[-3000:]
    assert "error: step 6 (stage 0): loss nan is not finite; no weight updated (2 in a row" in out
    assert (f"stopped at step 6 (bad_step); the last good checkpoint: {run}/checkpoints/step4. The same command "
            "resumes from it; train.skip_steps=[5,6] leaves these batches out. Exit 4") in out
    assert not (run / "checkpoints" / "step6").exists()
    code, out = _run(tiny_shards, tmp_path, "stop", "train.max_bad_steps=2", "train.skip_steps=[5,6]",
                     faults=[SPIKE, *BAD])
    assert code == 0 and f"resumed from {run}/checkpoints/step4" in out, out[-3000:]
    _assert_same_weights(run, never_saw_them("fp32"))
    _assert_checkpoints_finite(run)


def test_latent_collapse_stops_the_run_when_asked(tiny_shards, tmp_path):
    code, out = _run(tiny_shards, tmp_path, "collapse", "train.on_collapse=stop", "train.collapse_patience=2",
                     faults=[{"kind": "collapse", "step": 3}])
    assert code != 0 and "exitcode  : 4" in out, out[-3000:]
    assert "error: step 4 (stage 0): latent collapse: mean pairwise cosine 1.0000 > 0.99 (train.collapse_cosine) " \
           "for 2 logged steps in a row (train.collapse_patience=2)" in out
    assert "stopped at step 4 (collapse); the last good checkpoint: " in out
    event, = _events(tmp_path / "collapse", "collapse")
    assert event["action"] == "stop" and event["latent_cosine"] > 0.999 and event["stage"] == 0


def test_a_non_finite_validation_loss_writes_no_checkpoint(tiny_shards, tmp_path):
    """Collapse only warned (the default); the epoch's validation loss NaN: no epoch checkpoint, no best."""
    code, out = _run(tiny_shards, tmp_path, "valid", "train.validate=true", "train.max_steps=0",
                     "train.steps_per_epoch=4", "train.collapse_patience=2",
                     faults=[{"kind": "collapse", "step": 1}, {"kind": "nan_valid"}])
    run = tmp_path / "valid"
    assert code != 0 and "exitcode  : 4" in out, out[-3000:]
    assert "warning: step 2 (stage 0): latent collapse: mean pairwise cosine" in out
    assert "warning: step 4 (stage 0): latent collapse" in out               # again, every patience steps
    assert "error: step 4: the validation loss (nan) is not finite; checkpoint not written" in out
    assert f"the last good checkpoint: {run}/checkpoints/step2" in out
    assert (run / "checkpoints" / "latest").read_text() == "step2" and not (run / "checkpoints" / "epoch0").exists()


def test_weights_that_are_not_finite_are_never_checkpointed(tiny_shards, tmp_path):
    code, out = _run(tiny_shards, tmp_path, "weights", "train.max_steps=4",
                     faults=[{"kind": "nan_weight", "step": 2, "rank": 1}])
    assert code != 0 and "exitcode  : 4" in out, out[-3000:]
    assert "error: step 2: a weight is not finite; checkpoint not written" in out
    assert "stopped at step 2 (bad_weights); no checkpoint was written yet. The same command starts over. Exit 4" in out
    from pipeline.engine import checkpoint
    assert checkpoint.complete_tags(str(tmp_path / "weights" / "checkpoints")) == []
