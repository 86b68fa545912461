"""The memory plan: real model shapes on the meta device, DeepSpeed's own estimator, every recipe."""
import glob
import os
import subprocess
import sys

import pytest

from pipeline.engine.config import load_config
from pipeline.engine.ds_config import resolve_ds_config
from pipeline.engine.gather_policy import GATHERED, STREAMED
from pipeline.engine.grad_reduce import AFTER_BACKWARD, OVERLAPPED
from pipeline.engine.memory_plan import GIB, Hardware, base_passes, make_plan, model_states
from pipeline.engine.model_shapes import meta_reasoner, model_sizes
from pipeline.plan import plan_for
from tests.conftest import REPO

pytestmark = pytest.mark.unit
LLAMA = {"1b": "meta-llama/Llama-3.2-1B-Instruct", "3b": "meta-llama/Llama-3.2-3B-Instruct",
         "8b": "meta-llama/Llama-3.1-8B-Instruct", "70b": "meta-llama/Llama-3.1-70B-Instruct"}
# Published parameter counts of the models (their own vocabulary of 128,256, no added tokens).
PUBLISHED = {"1b": 1_235_814_400, "3b": 3_212_749_824, "8b": 8_030_261_248, "70b": 70_553_706_496}
# The hardware each recipe is written for (its header comment says so).
RECIPE_HARDWARE = {"tiny-cpu": Hardware(1, 2, 8.0, 24.0), "llama3.1-70b-codi-simcot": Hardware(4, 8, 80.0)}


def _full_finetune(shape: str):
    return load_config(None, [f"model.name_or_path={LLAMA[shape]}", "method.name=cot"])


@pytest.mark.parametrize("shape", PUBLISHED)
def test_meta_device_shapes_have_the_published_parameter_counts(shape):
    sizes = model_sizes(_full_finetune(shape), vocab_size=128_256)
    assert sizes.total == PUBLISHED[shape] and sizes.trainable == sizes.total


@pytest.mark.parametrize("shape", PUBLISHED)
@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
def test_model_states_agree_with_deepspeeds_estimator(shape, offload_optimizer, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    sizes = model_sizes(_full_finetune(shape), vocab_size=128_256)
    nodes, per_node = (4, 8) if shape == "70b" else (1, 8)
    cpu_mem, gpu_mem, largest = estimate_zero3_model_states_mem_needs(
        sizes.total, sizes.largest_module, per_node, nodes, cpu_offload=offload_optimizer,
        cpu_offload_params=offload_params, zero_init=True, additional_buffer_factor=1.0)
    device, cpu = model_states(sizes, 3, nodes * per_node, dtype_bytes=2, grad_bytes=4,
                               offload_optimizer=offload_optimizer, offload_params=offload_params)
    ours_gpu, ours_cpu_per_node = sum(device.values()) * GIB, cpu * per_node * GIB
    ds_gpu = gpu_mem - largest           # DeepSpeed adds one gathered layer; the plan counts gathered weights apart
    assert ours_gpu == pytest.approx(ds_gpu, rel=0.10, abs=1e6)
    if offload_optimizer:
        assert ours_cpu_per_node == pytest.approx(cpu_mem, rel=0.10)


def _recipes():
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(str(REPO / "configs" / "*.yaml")))


@pytest.mark.parametrize("recipe", _recipes())
def test_every_recipe_builds_resolves_and_plans_on_its_hardware(recipe):
    run = load_config(str(REPO / "configs" / f"{recipe}.yaml"))
    model = meta_reasoner(run)
    assert (model.step_decoder is not None) == run.method.simcot
    assert (model.projection is not None) == (run.method.name == "codi")
    sizes = model_sizes(run)
    if run.model.name_or_path.startswith("meta-llama/"):
        assert sizes.vocab >= 128_256
    hardware = RECIPE_HARDWARE.get(recipe, Hardware(1, 8, 80.0))
    ds = resolve_ds_config(str(REPO / run.deepspeed), run, hardware.world, sizes.hidden, on_cuda=recipe != "tiny-cpu",
                           bf16=recipe != "tiny-cpu", trainable_params=sizes.trainable)
    assert "auto" not in str(ds)
    plan = make_plan(run, sizes, ds, hardware)
    assert plan.fits, plan.render()
    if plan.stage < 3:               # DeepSpeed's ZeRO-1/2 hooks stay: after_backward is ZeRO-3's
        assert plan.grad_reduce == OVERLAPPED
    if recipe == "llama3.1-70b-codi-simcot":
        # the whole model (its full-size step decoder included) would be 266 GiB gathered: it streams
        assert plan.policy == STREAMED and plan.gathered[GATHERED] > 80 > plan.device_gib


def test_a_latent_method_streams_pass_by_pass_when_the_gathered_model_does_not_fit():
    recipe = str(REPO / "configs" / "llama3.1-8b-codi-simcot.yaml")
    roomy, _ = plan_for(recipe, [], 1, 8, 80.0, 1024.0)
    tight, sizes = plan_for(recipe, ["deepspeed=ds_configs/zero3_offload.json"], 1, 8, 24.0, 1024.0)
    assert roomy.fits and roomy.policy == GATHERED
    assert tight.fits and tight.policy == STREAMED
    # every pass gathers the base again, in forward and in backward: 7 latent-loop passes (6 latents)
    # and the teacher's, against one gather of the whole model
    assert base_passes(load_config(recipe)) == 8
    bf16_gib = 2 / GIB
    assert tight.gather_volume[GATHERED] == pytest.approx(sizes.total * bf16_gib)
    rest = sizes.total - sizes.base                   # the step decoder (one pass) and the projection
    assert tight.gather_volume[STREAMED] == pytest.approx(2 * (8 * sizes.base + rest) * bf16_gib)
    assert tight.gather_volume[STREAMED] > 9 * tight.gather_volume[GATHERED]


def test_a_full_fine_tune_of_a_latent_method_holds_the_base_gradients_its_passes_add_to():
    lora, _ = plan_for(str(REPO / "configs" / "llama3.1-8b-codi-simcot.yaml"), [], 1, 8, 80.0, 1024.0)
    full, sizes = plan_for(str(REPO / "configs" / "llama3.1-8b-codi-simcot-full.yaml"), [], 1, 8, 80.0, 1024.0)
    assert full.pass_grads_gib == pytest.approx(sizes.loop_trainable * 2 / GIB)    # bf16, the base and projection
    assert full.pass_grads_gib > 14 and lora.pass_grads_gib < 1                     # LoRA: adapter gradients only
    cot, _ = plan_for(None, [f"model.name_or_path={LLAMA['8b']}", "method.name=cot"], 1, 8, 80.0, 1024.0)
    assert cot.pass_grads_gib == 0                    # one pass: ZeRO reduces each gradient as it is made


def test_a_single_pass_method_streams_when_the_gathered_model_does_not_fit():
    args = [f"model.name_or_path={LLAMA['8b']}", "method.name=cot", "model.gradient_checkpointing=true",
            "train.micro_batch_size=2"]
    roomy, _ = plan_for(None, args, 1, 8, 80.0, 1024.0)
    tight, _ = plan_for(None, args, 1, 8, 32.0, 1024.0)
    assert roomy.fits and roomy.policy == GATHERED
    assert tight.fits and tight.policy == STREAMED
    assert tight.gathered[STREAMED] < tight.gathered[GATHERED] / 4


def test_gradients_are_reduced_after_backward_only_when_their_full_size_fits_too():
    args = [f"model.name_or_path={LLAMA['8b']}", "method.name=cot", "model.gradient_checkpointing=true",
            "train.micro_batch_size=2"]
    roomy, sizes = plan_for(None, args, 1, 8, 80.0, 1024.0)
    middle, _ = plan_for(None, args, 1, 8, 44.0, 1024.0)
    tight, _ = plan_for(None, args, 1, 8, 32.0, 1024.0)
    assert (roomy.policy, roomy.grad_reduce) == (GATHERED, AFTER_BACKWARD)
    assert (middle.policy, middle.grad_reduce) == (GATHERED, OVERLAPPED)
    assert (tight.policy, tight.grad_reduce) == (STREAMED, OVERLAPPED)
    # CoT has one pass: DeepSpeed's hooks would free each gradient as it is made; after backward
    # holds all of them, 2 bytes per parameter
    assert roomy.full_grads_gib == pytest.approx(sizes.trainable * 2 / GIB) and roomy.pass_grads_gib == 0
    assert roomy.device_gib == pytest.approx(middle.device_gib + roomy.full_grads_gib)
    assert "policy gathered, gradients reduced after backward" in roomy.render()


def test_checkpointing_shrinks_the_planned_activations_and_the_advice_says_so():
    plan, _ = plan_for(str(REPO / "configs" / "llama3.2-1b-codi-simcot.yaml"),
                       ["model.gradient_checkpointing=false"], 1, 8, 16.0, 1024.0)
    assert plan.activations["checkpointed"] < plan.activations["full"] / 5
    assert not plan.fits and plan.advice[0].startswith("model.gradient_checkpointing=true")


def _plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.plan", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_plan_cli_exits_0_when_it_fits_3_when_not_and_2_for_a_bad_config(tmp_path):
    fits = _plan_cli("--config", "configs/llama3.1-8b-codi-simcot.yaml", "--nodes", "1", "--gpus-per-node", "8",
                     "--gpu-mem-gib", "80")
    assert fits.returncode == 0 and "policy gathered" in fits.stdout and "-> fits" in fits.stdout, fits.stderr
    assert "global batch 128" in fits.stdout          # the recipe's, whatever the number of GPUs
    tight = _plan_cli("--config", "configs/llama3.1-8b-codi-simcot.yaml", "--gpu-mem-gib", "24")
    assert tight.returncode == 3 and "DOES NOT FIT" in tight.stdout
    assert "  why: " in tight.stdout and "  change: " in tight.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lrr: 1}\n")
    broken = _plan_cli("--config", str(bad))
    assert broken.returncode == 2 and "did you mean 'train.lr'" in broken.stderr
