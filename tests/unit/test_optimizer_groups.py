"""Weight decay as HF Trainer (the CODI reference) applies it: none on biases and norm weights."""
import pytest
import torch

from pipeline.engine.build_model import optimizer_groups
from pipeline.latent.methods import MethodConfig
from pipeline.latent.reasoner import LatentReasoner
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.unit


def test_biases_and_norm_weights_get_no_weight_decay():
    model = LatentReasoner(tiny_llama(100), MethodConfig("codi", num_latent=2, simcot=True))
    decay, no_decay = optimizer_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    expected = {n for n, _ in model.named_parameters() if n.endswith("bias") or "norm" in n or n.startswith(
        "projection.3.")}                               # the projection ends in a LayerNorm (weight and bias)
    assert {names[id(p)] for p in no_decay["params"]} == expected
    assert "base.model.layers.0.input_layernorm.weight" in expected and "projection.0.bias" in expected
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - expected
    assert "base.model.embed_tokens.weight" in {names[id(p)] for p in decay["params"]}


def test_frozen_parameters_and_empty_groups_are_left_out():
    model = LatentReasoner(tiny_llama(100), MethodConfig("cot"))
    for name, p in model.named_parameters():
        p.requires_grad = "q_proj" in name            # as under LoRA: no trainable bias or norm
    (only,) = optimizer_groups(model, 0.01)
    assert only["weight_decay"] == 0.01 and all(p.requires_grad for p in only["params"])
    assert len(only["params"]) == sum(1 for n, _ in model.named_parameters() if "q_proj" in n)
    torch.optim.AdamW(optimizer_groups(model, 0.01))   # a valid torch optimizer argument
