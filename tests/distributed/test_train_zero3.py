"""2-rank DeepSpeed ZeRO-3 training on CPU (gloo), through the real ``pipeline.train`` CLI."""
import glob
import json

import pytest
import torch

from tests.distributed.conftest import losses_by_step, torchrun

pytestmark = pytest.mark.distributed
COMMON = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "train.micro_batch_size=8",
          "train.lr=3e-3", "train.log_every=1", "train.warmup_steps=2"]


def _args(tiny_shards, runs, name, *extra):
    return ["--config", "configs/tiny-cpu.yaml", f"data={tiny_shards}", f"runs_dir={runs}", f"name={name}",
            *COMMON, *extra]


def _trainable(run_dir) -> int:
    from data_prep import load_shards
    from pipeline.engine.config import load_config
    from pipeline.engine.model_shapes import model_sizes

    run = load_config(str(run_dir / "config.yaml"))
    return model_sizes(run, len(load_shards(run.data).tokenizer)).trainable


def _shm_buffers() -> set[str]:
    return set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))


def test_coconut_simcot_trains_and_writes_the_run_directory(tiny_shards, tmp_path):
    shm_before = _shm_buffers()
    code, out = torchrun(_args(tiny_shards, tmp_path, "coco", "method.name=coconut", "method.simcot=true",
                               "curriculum.start_stage=1", "train.max_steps=14"))
    assert code == 0, out[-3000:]
    run = tmp_path / "coco"
    losses = losses_by_step(run)
    assert sorted(losses) == list(range(1, 15))
    assert sum(list(losses.values())[-3:]) / 3 < 0.8 * losses[1]            # it learns
    assert _shm_buffers() <= shm_before          # DeepSpeed's shm all-reduce buffers (66 MB each) do not leak
    steps = losses_by_step(run, "loss/step_ce")
    assert steps[14] < steps[1]                                               # the decoder learns too
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 8
    # one gradient bucket holds every trainable parameter of a model this small: one reduce per step
    assert ds["zero_optimization"]["reduce_bucket_size"] == _trainable(run)
    assert "auto" not in json.dumps(ds)
    assert (run / "checkpoints" / "latest").read_text() == "epoch0"
    assert (run / "checkpoints" / "epoch0" / "COMPLETE.json").exists()
    assert "global batch = 16 (micro 8 x accum 1 x 2 ranks)" in out
    assert "memory plan: 2 rank(s), ZeRO-3, fp32, global batch 16" in out and "-> fits" in out
    assert "ZeRO-3 parameters: gathered (memory plan)" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tb")).Reload()
    for tag in ("loss/answer_ce", "loss/step_ce", "loss/total", "lr", "grad_norm", "mfu(%)", "time/step_s",
                "time/eta_s", "memory/max_rss(GiB)",
                "throughput/tokens_per_s", "latent/latent_cosine", "latent/latent_norm_ratio", "valid/total"):
        assert tag in events.Tags()["scalars"], tag


def test_resume_reproduces_the_uninterrupted_losses_exactly(tiny_shards, tmp_path):
    """The interrupted run reduces its gradients after backward (the plan's pick), the straight one
    with DeepSpeed's per-parameter hooks: their losses and gradient norms agree bit for bit throughout."""
    extra = ["method.name=codi", "method.simcot=true", "method.num_latent=3", "train.grad_accum=2",
             "train.max_steps=8", "train.validate=false"]
    code, out = torchrun(_args(tiny_shards, tmp_path, "straight", *extra, "train.grad_reduce=overlapped"))
    assert code == 0, out[-3000:]
    assert "gradients reduced overlapped (train.grad_reduce)" in out
    code, out = torchrun(_args(tiny_shards, tmp_path, "resumed", *extra, "train.stop_at_step=4"))
    # every rank exits 75 ("requeue me"); torchrun itself reports that as a failed run
    assert code != 0 and "exitcode  : 75" in out and "stopped by train.stop_at_step at step 4" in out, out[-3000:]
    assert "gradients reduced after backward (memory plan)" in out
    assert (tmp_path / "resumed" / "REQUEUE").exists()
    code, out = torchrun(_args(tiny_shards, tmp_path, "resumed", *extra))
    assert code == 0 and "resumed from" in out, out[-3000:]
    straight, resumed = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(1, 9)] == [straight[s] for s in range(1, 9)]
    # the gradient norm: DeepSpeed's (overlapped) and grad_norm.py's foreach (after_backward) on 2 ranks
    norms = [losses_by_step(tmp_path / run, "grad_norm") for run in ("straight", "resumed")]
    assert norms[0] == norms[1] and len(norms[0]) == 8 and all(n > 0 for n in norms[0].values())


def test_ranks_with_different_data_shapes_do_not_hang(tiny_shards, tmp_path, spm_tokenizer_dir):
    """Rank 0 gets only problems without steps (every SIM-CoT slot masked), rank 1 problems with
    steps: the module-call sequence is the same, so ZeRO-3's gathers stay matched."""
    from data_prep.build import BuildOptions, run_build
    lines = []
    for i in range(64):
        steps = "" if i % 2 == 0 else "<<1+2=3>> <<3*2=6>>"
        lines.append(f"Q{i}: Ann has 1 pen and gets 2 more, then doubles them. How many?||{steps} #### 6\n")
    raw = tmp_path / "train.txt"
    raw.write_text("".join(lines))
    shards = tmp_path / "asym"
    run_build(BuildOptions([f"gsm8k-aug:{raw}"], str(spm_tokenizer_dir), str(shards)), log=lambda *_: None)
    code, out = torchrun(["--config", "configs/tiny-cpu.yaml", f"data={shards}", f"runs_dir={tmp_path}",
                          "name=asym", *COMMON, "train.shuffle=false", "method.name=codi", "method.simcot=true",
                          "method.num_latent=2", "train.max_steps=3"], timeout=240)
    assert code == 0, out[-3000:]
    assert sorted(losses_by_step(tmp_path / "asym")) == [1, 2, 3]
    # Coconut without pad_latent_to_max, after its last stage: rank 0's rows hold no latents, rank 1's
    # four; with uniform_prob some rows train at a drawn stage. Under per-module gathers (streamed)
    # a rank that ran fewer latent passes would wait forever in an all-gather the other never makes.
    code, out = torchrun(["--config", "configs/tiny-cpu.yaml", f"data={shards}", f"runs_dir={tmp_path}",
                          "name=ragged", *COMMON, "train.shuffle=false", "method.name=coconut", "method.simcot=true",
                          "method.max_latent_stage=2", "curriculum.start_stage=3", "method.pad_latent_to_max=false",
                          "method.uniform_prob=0.5", "train.zero3_gather=streamed", "train.max_steps=3",
                          "train.validate=false"], timeout=240)
    assert code == 0, out[-3000:]
    assert "ZeRO-3 parameters: streamed (train.zero3_gather)" in out
    assert sorted(losses_by_step(tmp_path / "ragged")) == [1, 2, 3]


def test_simcot_continues_from_an_earlier_runs_checkpoint(tiny_shards, tmp_path):
    """CoT run -> Coconut+SIM-CoT run started from its base weights (module layout differs)."""
    code, out = torchrun(_args(tiny_shards, tmp_path, "cot", "train.max_steps=6", "train.validate=false"))
    assert code == 0, out[-3000:]
    code, out = torchrun(_args(tiny_shards, tmp_path, "simcot", "method.name=coconut", "method.simcot=true",
                               "curriculum.start_stage=1", "train.max_steps=2", "train.validate=false",
                               f"checkpoint.init_from={tmp_path / 'cot' / 'checkpoints'}"))
    assert code == 0 and "initialised weights from" in out, out[-3000:]
    assert "step decoder from the pretrained weights (method.decoder_init=pretrained)" in out
    cot_final = losses_by_step(tmp_path / "cot", "loss/answer_ce")[6]
    fresh_start = 6.0      # ln(517) = 6.25: an untrained model's loss on this tokenizer
    assert losses_by_step(tmp_path / "simcot", "loss/answer_ce")[1] < min(fresh_start, cot_final + 2.0)


def test_stages_of_n_steps_and_a_branch_from_one_stage_keeps_the_step_decoder(tiny_shards, tmp_path):
    """The sweep's chain (a curriculum stage every 2 steps, every stage kept) and its branch:
    ``init_from`` a tag dir loads that stage's base and its trained step decoder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    simcot = ["method.name=coconut", "method.simcot=true", "method.max_latent_stage=2", "train.validate=false"]
    code, out = torchrun(_args(tiny_shards, tmp_path, "chain", *simcot, "curriculum.start_stage=1",
                               "train.steps_per_epoch=2", "train.epochs=10", "train.max_steps=4",
                               "checkpoint.keep_last=0"))
    assert code == 0, out[-3000:]
    stages = {m["step"]: m["stage"] for m in map(json.loads, open(tmp_path / "chain" / "metrics.jsonl"))
              if "stage" in m}
    assert stages == {1: 1, 2: 1, 3: 2, 4: 2}
    stage1 = tmp_path / "chain" / "checkpoints" / "epoch0"
    assert stage1.is_dir() and (stage1.parent / "epoch1").is_dir()
    code, out = torchrun(_args(tiny_shards, tmp_path, "branch", *simcot, "curriculum.start_stage=3",
                               "train.max_steps=1", "train.lr=0", f"checkpoint.init_from={stage1}"))
    assert code == 0 and f"initialised weights from {stage1}" in out, out[-3000:]
    before = get_fp32_state_dict_from_zero_checkpoint(str(stage1.parent), tag="epoch0")
    after = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "branch" / "checkpoints"))
    decoder = [k for k in before if k.startswith("step_decoder.")]
    assert decoder and all(torch.equal(before[k], after[k]) for k in before)     # lr 0: unchanged
    assert any(not torch.equal(before[k], before["base." + k[len("step_decoder."):]]) for k in decoder)


def test_a_corrupted_checkpoint_stops_the_resume_with_the_file_named(tiny_shards, tmp_path):
    args = _args(tiny_shards, tmp_path, "corrupt", "train.max_steps=2", "train.validate=false")
    code, out = torchrun(args)
    assert code == 0, out[-3000:]
    shard = next((tmp_path / "corrupt" / "checkpoints" / "epoch0").glob("*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out = torchrun(args + ["train.max_steps=4"])
    assert code != 0 and f"error: {shard}: differs from COMPLETE.json" in out, out[-3000:]


@pytest.mark.parametrize("nproc,accum", [(1, 4), (2, 2)])
def test_a_global_batch_is_the_same_on_one_and_two_ranks(tiny_shards, tmp_path, nproc, accum):
    code, out = torchrun(_args(tiny_shards, tmp_path, "global", "train.micro_batch_size=4",
                               "train.global_batch_size=16", "train.max_steps=1", "train.validate=false"), nproc=nproc)
    assert code == 0, out[-3000:]
    assert f"global batch = 16 (micro 4 x accum {accum} x {nproc} ranks)" in out
    ds = json.loads((tmp_path / "global" / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == accum
