import json
import subprocess

import pytest

from pipeline.engine.config import ConfigError, load_config
from pipeline.engine.ds_config import DeepSpeedConfigError, resolve_ds_config
from tests.conftest import REPO

pytestmark = pytest.mark.unit


def test_yaml_plus_dotted_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nmethod: {name: coconut}\ntrain: {lr: 1.0e-4}\n")
    run = load_config(str(recipe), ["train.lr=3e-3", "method.simcot=true", "model.tiny.hidden_size=64"])
    assert (run.name, run.method.name, run.method.simcot, run.train.lr, run.model.tiny.hidden_size) == \
        ("x", "coconut", True, 0.003, 64)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("modle.tiny.hidden_size=3", "did you mean 'model'?"),
    ("train.lr=fast", "train.lr: expected float"),
    ("method.simcot=maybe", "method.simcot: expected bool"),
    ("train.epochs=1.5", "train.epochs: expected int"),
    ("method.name=icot", "expected one of coconut, codi, cot, nocot, nothought, pause"),
    ("method.name=cot", None),
    ("method.decoder_init=random", "method.decoder_init: pretrained or base"),
    ("method.distill_loss=l1", "method.distill_loss: smooth_l1 or l2"),
    ("method.remove_eos=false", "method.remove_eos=false is CODI's option"),
    ("method.reference_attention=true", "method.reference_attention emulates CODI's released code"),
    ("model.decoder_path=tiny", "model.decoder_path is the SIM-CoT step decoder: set method.simcot"),
    ("method.progressive_train=true", "needs a method with a curriculum"),
    ("method.reference_step_truncation=true", "emulates CODI's released SIM-CoT code"),
    ("method.reference_quirks=true", "coconut has none left to emulate"),
    ("train.grad_reduce=once", "train.grad_reduce: auto, overlapped or after_backward"),
])
def test_config_errors_name_the_key_and_the_fix(override, message):
    overrides = [override] + (["method.simcot=true"] if override == "method.name=cot" else [])
    overrides += ["method.name=coconut"] if override == "method.reference_quirks=true" else []
    with pytest.raises(ConfigError, match=message or "method.simcot needs"):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides, message", [
    (["method.name=coconut", "method.simcot=true", "method.step_targets=pieces"],
     "method.step_targets=pieces chooses CODI \\+ SIM-CoT's decoder targets"),
    (["method.name=codi", "method.simcot=true", "method.step_targets=steps"], "method.step_targets: spans or pieces"),
    (["method.name=codi", "method.simcot=true", "method.reference_quirks=true", "method.step_targets=pieces"],
     "reference_quirks reproduces the reference"),
    (["method.name=codi", "method.reference_quirks=true", "method.teacher_cot=pieces"],
     "reference_quirks reproduces the reference"),
    (["method.name=codi", "method.reference_quirks=true", "model.attn_implementation=flash_attention_2"],
     "4-D mask that flash-attention kernels do not take"),
    (["method.name=cot", "method.projection=false"], "method.projection=false turns off CODI's prj; cot has none"),
])
def test_codi_fidelity_switches_refuse_what_they_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_reference_quirks_turns_on_every_emulation():
    method = load_config(None, ["method.name=codi", "method.simcot=true", "method.reference_quirks=true"]).method
    assert method.reference_attention and method.reference_step_truncation and method.step_targets == "spans"


def test_every_recipe_in_configs_loads():
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) >= 8
    for recipe in recipes:
        load_config(str(recipe))


def test_ds_config_resolves_every_auto():
    run = load_config(None, ["train.micro_batch_size=4", "train.grad_accum=3", "train.max_grad_norm=2.0",
                             "train.lr=5e-4"])
    cfg = resolve_ds_config(str(REPO / "ds_configs/zero3.json"), run, world_size=8, hidden_size=2048,
                            on_cuda=True, bf16=True)
    assert "auto" not in json.dumps(cfg)
    assert cfg["train_batch_size"] == 4 * 3 * 8
    assert cfg["gradient_clipping"] == 2.0 and cfg["bf16"]["enabled"] is True
    assert cfg["optimizer"]["params"] == {"lr": 5e-4, "betas": [0.9, 0.999], "weight_decay": 0.01, "torch_adam": False}
    zero = cfg["zero_optimization"]
    assert zero["reduce_bucket_size"] == 2048 ** 2 and zero["stage3_param_persistence_threshold"] == 20480
    cpu = resolve_ds_config(str(REPO / "ds_configs/zero3.json"), run, 2, 64, on_cuda=False, bf16=False)
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["bf16"]["enabled"] is False


def test_ds_config_inconsistent_batch_is_an_error():
    run = load_config(None, [])
    with pytest.raises(DeepSpeedConfigError, match="train_batch_size"):
        resolve_ds_config({"train_batch_size": 7}, run, 2, 64, False, False)
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.foo"):
        resolve_ds_config({"zero_optimization": {"foo": "auto"}}, run, 1, 64, False, False)


def _launch(*args):
    result = subprocess.run(["bash", str(REPO / "launch.sh"), *args, "--dry-run"], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_launch_renders_local_cpu_ranks_with_quoted_arguments():
    out = _launch("train", "--config", "configs/tiny-cpu.yaml", "--nproc", "2", "name=a b; rm -rf /")
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m pipeline.train" in out
    assert r"name=a\ b\;\ rm\ -rf\ /" in out


def test_launch_renders_hostfile_and_no_ssh(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    out = _launch("train", "--config", "configs/tiny-cpu.yaml", "--hostfile", str(hosts))
    assert f"deepspeed.launcher.runner --hostfile {hosts}" in out and "--no_ssh" not in out
    out = _launch("train", "--config", "configs/tiny-cpu.yaml", "--hostfile", str(hosts), "--no-ssh",
                  "--node-rank", "1", "--master", "10.0.0.1")
    assert "--master_addr 10.0.0.1" in out and "--no_ssh --node_rank 1 --module pipeline.train" in out


def test_launch_passes_every_sweep_option_through_quoted():
    out = _launch("sweep", "--out", "runs/my sweep", "--nproc", "2", "--points", "1,2")
    assert out.strip().endswith("-m experiments.sweep --out runs/my\\ sweep --nproc 2 --points 1\\,2")


def test_launch_renders_a_slurm_script():
    out = _launch("slurm", "train", "--config", "configs/tiny-cpu.yaml", "--nodes", "2", "--gpus-per-node", "8",
                  "--partition", "gpu", "--time", "2:00:00", "train.lr=1e-4")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=USR1@120", "#SBATCH --output=runs/tiny-cpu/slurm-%j.out",
                 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
                 "export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in out, line
    assert "--nnodes 2 --nproc_per_node 8" in out
    assert "-m pipeline.train --config configs/tiny-cpu.yaml train.lr=1e-4" in out
    assert "srun --kill-on-bad-exit=1" in out


def test_launch_rejects_unknown_stages():
    result = subprocess.run(["bash", str(REPO / "launch.sh"), "fly"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown stage 'fly'" in result.stderr


def test_reference_quirks_is_one_switch_for_every_emulated_bug():
    quirks = load_config(None, ["method.name=codi", "method.simcot=true", "method.reference_quirks=true"]).method
    assert quirks.reference_attention and quirks.reference_step_truncation
    plain = load_config(None, ["method.name=codi", "method.reference_quirks=true"]).method
    assert plain.reference_attention and not plain.reference_step_truncation      # no step decoder to cut
