"""A compiled decoder stack never runs a stale graph: each change of what its graph reads from the
modules (a LoRA scaling, adapters switched off, a frozen weight, one layer built unlike the
others, the latent projection) compiles anew and computes what the eager stack computes; a model
changed past the budget stops with the change named (pipeline/latent/stack_key.py).

The graphs are dynamo's with the ``aot_eager`` backend: which graph runs is dynamo's guards'
decision whatever the backend (the inductor graphs: tests/unit/test_lean_forward.py)."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from pipeline.latent import lean_forward
from pipeline.latent.lean_forward import ColumnPasses, CompiledStack, column_block, lean_stack
from pipeline.latent.reasoner import Projection
from pipeline.latent.stack_key import KeyBudget, StackKey, StaleGraphError, one_forward
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.unit


@pytest.fixture
def compiled_stacks(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(lean_forward, "_COMPILED", {stack: CompiledStack(stack, backend="aot_eager")
                                                    for stack in (lean_stack, column_block)})
    yield
    torch._dynamo.reset()


def _lora_body():
    model = get_peft_model(tiny_llama(64, hidden=32, layers=2), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)          # zero at creation: the adapters would change nothing
    return model.base_model.model.model


def _whole(body, compiled: bool):
    """A whole-sequence pass and its backward -> (hidden, gradients by name)."""
    body.zero_grad(set_to_none=True)
    embeds = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    positions = torch.arange(5).expand(2, 5)
    hidden, _, _ = lean_forward.lean_forward(body, embeds, None, positions, [], compiled=compiled)
    hidden.square().sum().backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in body.named_parameters() if p.grad is not None}


def _lora_layers(body):
    return [m for m in body.modules() if isinstance(m, LoraLayer)]


CHANGES = {
    "a LoRA scaling": lambda body: [m.scaling.update(default=m.scaling["default"] * 3) for m in _lora_layers(body)],
    "adapters switched off": lambda body: [m.enable_adapters(False) for m in _lora_layers(body)],
    "a frozen adapter": lambda body: body.layers[0].self_attn.q_proj.lora_A.default.weight.requires_grad_(False),
    "an unfrozen weight": lambda body: body.layers[1].mlp.down_proj.weight.requires_grad_(True),
    "one layer unlike the others": lambda body: setattr(body.layers[1].input_layernorm, "variance_epsilon", 0.5),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_changed_module_compiles_anew_and_computes_what_eager_does(change, compiled_stacks):
    body = _lora_body()
    before, before_grads = _whole(body, compiled=True)
    assert torch.allclose(before, _whole(body, compiled=False)[0], atol=1e-5)
    CHANGES[change](body)
    want, want_grads = _whole(body, compiled=False)
    got, got_grads = _whole(body, compiled=True)
    assert len(lean_forward._COMPILED[lean_stack].budget.seen) == 2
    assert torch.allclose(got, want, atol=1e-5), change
    assert sorted(got_grads) == sorted(want_grads)
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-5), name
    changed = not torch.allclose(want, before, atol=1e-4) or sorted(want_grads) != sorted(before_grads)
    assert changed, f"{change} changes nothing the stack computes: the test would not see a stale graph"


def test_the_key_is_what_tells_the_graphs_apart(compiled_stacks, monkeypatch):
    """A control: the changed model called with the old key runs the old graph (a stale output),
    so the tests above would see staleness where it happened."""
    body = _lora_body()
    before, _ = _whole(body, compiled=True)
    old = lean_forward._COMPILED[lean_stack].budget.seen[0]
    CHANGES["a LoRA scaling"](body)
    with monkeypatch.context() as patch:
        patch.setattr(StackKey, "of", staticmethod(lambda *args, **kwargs: old))
        stale, _ = _whole(body, compiled=True)
    assert torch.equal(stale, before)
    assert not torch.allclose(stale, _whole(body, compiled=False)[0], atol=1e-4)


def test_a_changed_projection_compiles_anew_in_the_latent_loop(compiled_stacks):
    body = _lora_body()
    project = Projection(32)
    torch.manual_seed(1)
    latent = torch.randn(2, 1, 32)
    past = [(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)) for _ in body.layers]
    positions = torch.arange(3, 5).expand(2, 2)

    def passes(compiled):
        return ColumnPasses(body, positions, None, past, compiled, latent, project)(latent)[0]

    assert torch.allclose(passes(True), passes(False), atol=1e-5)
    project[3] = torch.nn.Identity()           # the projection built without its LayerNorm
    want = passes(False)
    assert torch.allclose(passes(True), want, atol=1e-5)
    assert len(lean_forward._COMPILED[column_block].budget.seen) == 2


def test_a_model_changed_past_the_budget_stops_naming_the_change():
    body = _lora_body()
    budget = KeyBudget("lean_stack", limit=2)
    budget.admit(StackKey.of(body, compiled=True))
    budget.admit(StackKey.of(body, compiled=True))           # the same structure: nothing new
    CHANGES["one layer unlike the others"](body)
    budget.admit(StackKey.of(body, compiled=True))
    CHANGES["a LoRA scaling"](body)
    with pytest.raises(StaleGraphError, match=r"budget of 2.*layers\.0\.self_attn\.q_proj: .*scaling.*"
                                              r"model\.body_forward=lean"):
        budget.admit(StackKey.of(body, compiled=True))


def test_within_one_forward_a_key_is_taken_once_and_the_next_forward_takes_it_anew():
    body = _lora_body()
    with one_forward():
        first = StackKey.of(body, compiled=True)
        CHANGES["a LoRA scaling"](body)
        assert StackKey.of(body, compiled=True) is first
    with one_forward():
        assert StackKey.of(body, compiled=True).text != first.text
    assert StackKey.of(body, compiled=True).text != first.text      # outside a forward: at every call


def test_deepspeed_bookkeeping_and_eager_keys_stay_out():
    body = _lora_body()
    key = StackKey.of(body, compiled=True)
    body.layers[0].ds_grads_remaining = 3                    # ZeRO-3 counts these during a step
    assert StackKey.of(body, compiled=True).text == key.text
    assert StackKey.of(body).parts == () and StackKey.of(body).checkpointed == (False, False)


def test_dynamo_fails_past_its_recompile_limit_instead_of_running_eager_unnoticed(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", False)
    CompiledStack(lean_stack, backend="aot_eager")
    assert torch._dynamo.config.recompile_limit == lean_forward.RECOMPILE_LIMIT
    assert torch._dynamo.config.fail_on_recompile_limit_hit
