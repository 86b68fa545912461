"""The lr schedule at chosen steps, and a global batch that does not change with the ranks."""
import math

import pytest
import torch

from pipeline.engine.config import ConfigError, for_world, load_config
from pipeline.engine.schedule import lr_factor, warmup_steps

pytestmark = pytest.mark.unit


def _train(**values):
    return load_config(None, [f"train.{k}={v}" for k, v in values.items()]).train


def test_codi_recipe_schedule_is_hfs_cosine_to_zero_after_a_3_percent_warmup():
    from transformers import get_cosine_schedule_with_warmup

    t = load_config("configs/llama3.2-1b-codi-simcot.yaml").train
    total = 1000
    assert warmup_steps(total, t) == 30                                   # ceil(0.03 x 1000), as HF
    assert lr_factor(0, total, t) == pytest.approx(1 / 30)                # HF: 0 (a step that changes nothing)
    assert lr_factor(29, total, t) == 1.0
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    hf = get_cosine_schedule_with_warmup(optimizer, 30, total).lr_lambdas[0]
    for step in (30, 31, 250, 515, 999):
        assert lr_factor(step, total, t) == pytest.approx(hf(step), abs=1e-12)
    assert lr_factor(515, total, t) == pytest.approx(0.5)                 # half-way through the decay
    assert lr_factor(total, total, t) == 0.0


def test_default_cosine_ends_at_a_tenth_of_the_peak_and_constant_stays_flat():
    t = _train(schedule="cosine", warmup_steps=10)
    assert lr_factor(0, 100, t) == pytest.approx(0.1)
    assert lr_factor(10, 100, t) == 1.0
    assert lr_factor(55, 100, t) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, t) == pytest.approx(0.1)
    flat = _train(schedule="constant", warmup_steps=4)
    assert [lr_factor(s, 100, flat) for s in (0, 3, 4, 99)] == [0.25, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("world,accum", [(1, 16), (2, 8), (8, 2), (16, 1)])
def test_a_global_batch_derives_the_accumulation_from_the_ranks(world, accum):
    run = for_world(load_config(None, ["train.micro_batch_size=8", "train.global_batch_size=128"]), world)
    assert run.train.grad_accum == accum
    assert run.train.micro_batch_size * run.train.grad_accum * world == 128


def test_a_global_batch_the_ranks_cannot_divide_is_refused_with_the_numbers():
    run = load_config(None, ["train.micro_batch_size=16", "train.global_batch_size=128"])
    with pytest.raises(ConfigError, match=r"global_batch_size=128 is not a multiple of .*micro_batch_size=16 x 16"):
        for_world(run, 16)
    assert for_world(load_config(None, ["train.grad_accum=3"]), 4).train.grad_accum == 3   # no global: unchanged


def test_gpt2_coconut_recipes_run_in_fp32_and_codi_recipes_use_lora_dropout_01():
    for name in ("gpt2-cot", "gpt2-coconut", "gpt2-coconut-simcot"):
        assert load_config(f"configs/{name}.yaml").model.dtype == "fp32"
    for name in ("gpt2-codi-simcot", "llama3.2-1b-codi-simcot", "llama3.1-8b-codi-simcot"):
        run = load_config(f"configs/{name}.yaml")
        assert run.model.lora.dropout == 0.1 and run.train.global_batch_size == 128
