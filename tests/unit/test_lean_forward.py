"""The lean and compiled forwards (pipeline/latent/lean_forward.py) compute what transformers'
model computes: every loss and every gradient of a training step, for CoT, Coconut, CODI and
Jacobi, with ragged rows, the CODI reference's attention, GQA, biases, per-layer checkpointing;
the compiled one without recompiling across curriculum stages and batches."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen2ForCausalLM

from pipeline.latent import lean_forward
from pipeline.latent.collate import collate_aligned
from pipeline.latent.lean_forward import check_lean_support, resolve_body_forward
from pipeline.latent.loop import fill_latents
from pipeline.latent.methods import MethodConfig, layout
from pipeline.latent.reasoner import LatentReasoner
from tests.recording_kernel import COUNT, COUNTING, registered
from tests.tiny_models import tiny_llama
from tests.toy_records import RECORDS
from tests.toy_records import SPECIAL as SP

pytestmark = pytest.mark.unit
VOCAB = 100
METHODS = {
    "coconut+simcot, ragged": (MethodConfig("coconut", c_thought=1, max_latent_stage=3, pad_latent_to_max=False,
                                            simcot=True), 4),
    "coconut, 2 per step": (MethodConfig("coconut", c_thought=2, max_latent_stage=3), 2),
    "codi+simcot": (MethodConfig("codi", num_latent=4, simcot=True), 0),
    "codi+simcot, reference attention": (MethodConfig("codi", num_latent=4, simcot=True, reference_attention=True), 0),
    "cot": (MethodConfig("cot"), 0),
    "coconut+simcot, jacobi": (MethodConfig("coconut", c_thought=2, max_latent_stage=3, simcot=True,
                                            latent_update="jacobi", jacobi_iterations=2), 2),
}


def _batch(cfg: MethodConfig, stage: int, records=RECORDS):
    examples = [layout(r, SP, cfg, stage, [60, 61]) for r in records]
    return collate_aligned(examples, SP["latent"], SP["pad"], latent_span=max(e.n_latents for e in examples))


def _lm(seed: int, layers: int, kernel: str):
    model = tiny_llama(VOCAB, hidden=64, layers=layers, seed=seed)
    model.config._attn_implementation = kernel
    return model


def _step(cfg, body_forward: str, batch, checkpointing: bool = False, seed: int = 3, layers: int = 2,
          kernel: str = "sdpa"):
    """-> (losses, gradients by name) of one training forward and backward."""
    model = LatentReasoner(_lm(seed, layers, kernel), cfg, eos_id=SP["eos"],
                           step_decoder=_lm(seed + 1, layers, kernel) if cfg.simcot else None,
                           gradient_checkpointing=checkpointing, body_forward=body_forward)
    losses = model(batch)
    losses["total"].backward()
    return ({k: v.item() for k, v in losses.items()},
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


def assert_same_step(got, want, rel: float):
    (losses, grads), (want_losses, want_grads) = got, want
    for key, value in want_losses.items():
        assert losses[key] == pytest.approx(value, rel=rel, abs=1e-7), key
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert (grads[name] - grad).abs().max().item() <= rel * grad.abs().max().item() + 1e-12, name


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("method", list(METHODS))
def test_the_lean_forward_computes_every_loss_and_gradient_as_transformers_does(method, checkpointing):
    cfg, stage = METHODS[method]
    batch = _batch(cfg, stage)
    want = _step(cfg, "transformers", batch, checkpointing)
    assert_same_step(_step(cfg, "lean", batch, checkpointing), want, rel=1e-6)


def test_the_lean_forward_recomputes_checkpointed_layers_in_backward():
    """Per-layer checkpointing is really on: every pass's layer runs again in backward."""
    cfg, stage = METHODS["codi+simcot"]
    batch = _batch(cfg, stage)
    calls = {}
    for checkpointing in (False, True):
        model = LatentReasoner(tiny_llama(VOCAB, hidden=64), cfg, eos_id=SP["eos"], step_decoder=tiny_llama(VOCAB),
                               gradient_checkpointing=checkpointing, body_forward="lean")
        calls[checkpointing] = 0

        def counted(*_, key=checkpointing):
            calls[key] += 1
        model.base.model.layers[0].self_attn.q_proj.register_forward_hook(counted)
        model(batch)["total"].backward()
    assert calls[False] == 4 + 2 and calls[True] == 2 * calls[False]     # question, 3 columns, tail; teacher


@torch.no_grad()
def test_the_lean_forward_of_a_family_with_biases_and_grouped_heads():
    """Qwen2: biases in the q/k/v projections, 4 query heads over 2 key/value heads."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         attn_implementation="sdpa")).eval()
    batch = _batch(METHODS["coconut+simcot, ragged"][0], 4)
    embeds = model.get_input_embeddings()(batch.input_ids)
    args = (model.get_decoder(), embeds, batch.attention_mask, batch.position_ids, batch.first_latent,
            batch.n_latents)
    want = fill_latents(*args, latent_mask=batch.latent_mask())
    got = fill_latents(*args, latent_mask=batch.latent_mask(), body_forward="lean")
    assert torch.allclose(got.hidden, want.hidden, rtol=1e-6, atol=1e-6)
    assert torch.allclose(got.latents, want.latents, rtol=1e-6, atol=1e-6)


def test_auto_is_lean_where_the_family_allows_it_and_an_explicit_choice_that_cannot_run_is_refused():
    sdpa = tiny_llama(VOCAB).config
    eager = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, attn_implementation="eager")
    flex = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, attn_implementation="flex_attention")
    assert resolve_body_forward("auto", sdpa) == "lean" and check_lean_support(sdpa) is None
    assert resolve_body_forward("auto", eager) == "lean"         # the kernel is called through transformers' registry
    assert resolve_body_forward("auto", flex) == "transformers"
    assert resolve_body_forward("transformers", sdpa) == "transformers"
    with pytest.raises(ValueError, match="body_forward=compiled cannot run this model: attention flex_attention"):
        resolve_body_forward("compiled", flex)
    with pytest.raises(ValueError, match="body_forward='fast'"):
        resolve_body_forward("fast", sdpa)
    from transformers import GPT2Config
    assert "model_type 'gpt2'" in check_lean_support(GPT2Config())


def test_the_compiled_forward_matches_and_does_not_recompile_across_stages_and_batches(monkeypatch):
    """Latent counts 6, 4 and 8 (5, 3 and 7 column passes: a graph of 2 passes and one of 1 in every
    combination; ragged rows, each row's feeding inside those graphs), other first columns and
    another batch size compile nothing new; per-layer checkpointing is another structure (its own
    graphs, once). Losses within 1e-5 relative, gradients within 1e-5 of each tensor's largest. The
    compiled graphs call the configured kernel (a registered one) in every pass.
    Rows all alike and CODI (the teacher, the reference attention, the projection inside the column
    graphs), compiled: tests/distributed/test_gather_policy.py; across curriculum stages: P12."""
    monkeypatch.setattr(lean_forward, "COLUMNS_PER_GRAPH", 2)    # 5 by default: the same graph, smaller to compile
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]  # noqa: E731
    torch._dynamo.reset()
    ragged = {stages: MethodConfig("coconut", c_thought=2, max_latent_stage=stages, pad_latent_to_max=False,
                                   simcot=True) for stages in (3, 4)}       # the last stage: rows of fewer steps
    plain = MethodConfig("coconut", c_thought=2, max_latent_stage=3)       # no decoder: one graph fewer to compile
    runs = [(ragged[3], 4, RECORDS, False), (ragged[3], 4, RECORDS[1:], False), (ragged[4], 5, RECORDS, False),
            (plain, 1, RECORDS, True), (plain, 1, RECORDS[:2], True), (ragged[3], 4, RECORDS[::2], False)]
    seen = []
    for cfg, stage, records, checkpointing in runs:
        batch = _batch(cfg, stage, records)
        assert (batch.latent_mask() is not None) == (cfg is not plain)
        want = _step(cfg, "transformers", batch, checkpointing, layers=1)    # 1 layer: compiles in half the time
        with registered():
            assert_same_step(_step(cfg, "compiled", batch, checkpointing, layers=1, kernel=COUNTING), want, rel=1e-5)
            # forward: the question, the latent columns after the first, the tail, the step decoder, one layer each
            assert int(COUNT) == 1 + batch.n_latents - 1 + 1 + cfg.simcot
        seen.append(graphs())
    assert seen[0] > 0
    assert seen[0] == seen[1] == seen[2]                    # latent counts and a batch size: no recompile
    assert seen[3] > seen[2] and seen[3] == seen[4] == seen[5]   # checkpointing: its graphs once
