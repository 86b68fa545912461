"""Parallel (Jacobi) latent updates: T = M is sequential filling, T = 0 is pause tokens, gradients
reach every iteration, and batched generation equals one problem at a time."""
import dataclasses
import random

import pytest
import torch

from pipeline.inference.generate import latent_generate
from pipeline.latent.collate import collate_aligned, positions_from_mask
from pipeline.latent.loop import fill_latents, pass_count
from pipeline.latent.methods import MethodConfig, layout
from pipeline.latent.reasoner import LatentReasoner, Projection
from tests.tiny_models import tiny_llama
from tests.toy_records import RECORDS
from tests.toy_records import SPECIAL as SP

pytestmark = pytest.mark.unit
M = 4


def _batch(cfg, stage=0):
    return collate_aligned([layout(r, SP, cfg, stage, prefix_ids=[60, 61]) for r in RECORDS], SP["latent"], 0)


def _inputs(seed=0):
    model = tiny_llama(100, hidden=32, layers=2, seed=seed)
    batch = _batch(MethodConfig("codi", num_latent=M))
    embeds = model.get_input_embeddings()(batch.input_ids)
    return model, batch, embeds


@pytest.mark.parametrize("with_projection", [False, True])
def test_as_many_iterations_as_latents_is_the_sequential_loop(with_projection):
    model, batch, embeds = _inputs()
    torch.manual_seed(1)
    project = Projection(32) if with_projection else None
    args = (model.get_decoder(), embeds, batch.attention_mask, batch.position_ids, batch.first_latent, M)
    keep = batch.distill_index
    sequential = fill_latents(*args, project=project, keep_layers_at=keep)
    jacobi = fill_latents(*args, project=project, keep_layers_at=keep, jacobi_iterations=M)
    for name in ("hidden", "latents", "next_latent", "layer_states"):
        assert (getattr(sequential, name) - getattr(jacobi, name)).abs().max().item() <= 1e-5, name
    fewer = fill_latents(*args, project=project, jacobi_iterations=M - 1)
    assert (sequential.latents[:, :M - 1] - fewer.latents[:, :M - 1]).abs().max().item() <= 1e-5   # exact so far
    assert (sequential.latents[:, -1] - fewer.latents[:, -1]).abs().max().item() > 1e-3              # the last is not


def test_no_iterations_is_one_forward_over_the_latent_tokens():
    model, batch, embeds = _inputs()
    passes = fill_latents(model.get_decoder(), embeds, batch.attention_mask, batch.position_ids,
                          batch.first_latent, M, jacobi_iterations=0)
    whole = model.get_decoder()(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids).last_hidden_state
    assert (passes.hidden - whole).abs().max().item() <= 1e-5
    codi = LatentReasoner(tiny_llama(100, seed=2), MethodConfig("codi", num_latent=M, latent_update="jacobi",
                                                                 jacobi_iterations=0), eos_id=2)
    pause = LatentReasoner(tiny_llama(100, seed=2), MethodConfig("pause", num_latent=M), eos_id=2)
    codi_batch, pause_batch = _batch(codi.cfg), _batch(pause.cfg)
    assert torch.equal(codi_batch.input_ids, pause_batch.input_ids)
    assert abs(codi(codi_batch)["answer_ce"].item() - pause(pause_batch)["answer_ce"].item()) <= 1e-5


def _unrolled(body, embeds, mask, first, n, iterations, project):
    """Jacobi written out plainly: every iteration one uncached forward over the whole sequence."""
    positions = positions_from_mask(mask)
    x = embeds
    for _ in range(iterations):
        hidden = body(inputs_embeds=x, attention_mask=mask, position_ids=positions).last_hidden_state
        x = torch.cat([x[:, :first], project(hidden[:, first - 1:first + n - 1]), x[:, first + n:]], dim=1)
    return body(inputs_embeds=x, attention_mask=mask, position_ids=positions).last_hidden_state


def test_gradients_flow_through_every_iteration_as_in_the_unrolled_loop():
    grads = []
    for run in ("cached", "unrolled"):
        model, batch, embeds = _inputs(seed=4)
        torch.manual_seed(5)
        project = Projection(32)
        args = (model.get_decoder(), embeds, batch.attention_mask)
        if run == "cached":
            hidden = fill_latents(*args, batch.position_ids, batch.first_latent, M, project=project,
                                  jacobi_iterations=2).hidden
        else:
            hidden = _unrolled(*args, batch.first_latent, M, 2, project)
        weight = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(6))
        (hidden * weight * batch.attention_mask[..., None]).sum().backward()
        params = list(model.parameters()) + list(project.parameters())
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        latent_row = model.get_input_embeddings().weight.grad[SP["latent"]]
        assert latent_row.abs().sum() > 0     # the slots' starting embeddings reach the loss through iteration 1
    scale = max(a.abs().max().item() for a in grads[1])
    assert max((a - b).abs().max().item() for a, b in zip(*grads)) <= 1e-5 * scale, scale


@pytest.mark.parametrize("markers, with_projection", [((90, 92), False), ((93, 94), True)])
def test_batched_jacobi_generation_equals_one_problem_at_a_time(markers, with_projection):
    model = tiny_llama(100, hidden=64, layers=2, seed=3).eval()
    torch.manual_seed(7)
    project = Projection(64).eval() if with_projection else None
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(10, 90) for _ in range(rng.randint(3, 15))] + [markers[0]] + [91] * M
               + [markers[1]] for _ in range(5)]
    with torch.no_grad():
        batched = latent_generate(model, prompts, 91, -1, 8, project=project, jacobi_iterations=2)
        assert batched == [latent_generate(model, [p], 91, -1, 8, project=project, jacobi_iterations=2)[0]
                           for p in prompts]
        assert latent_generate(model, prompts, 91, -1, 8, project=project, jacobi_iterations=M) == \
            latent_generate(model, prompts, 91, -1, 8, project=project)


def test_jacobi_is_refused_for_a_method_without_latents():
    from pipeline.engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="latent_update=jacobi needs a method that fills latents, not cot"):
        load_config(None, ["method.name=cot", "method.latent_update=jacobi"])
    with pytest.raises(ConfigError, match="method.latent_update: sequential or jacobi"):
        load_config(None, ["method.name=codi", "method.latent_update=parallel"])
    config = load_config(None, ["method.name=coconut", "method.latent_update=jacobi", "method.jacobi_iterations=2"])
    assert config.method.jacobi == 2 and dataclasses.replace(config.method,
                                                                       latent_update="sequential").jacobi is None


@pytest.mark.parametrize("iterations", [None, 0, 2, M])
def test_pass_count_is_the_number_of_body_calls_the_memory_plan_budgets(iterations):
    model, batch, embeds = _inputs()
    body, calls = model.get_decoder(), []
    body.register_forward_pre_hook(lambda *_: calls.append(1))
    fill_latents(body, embeds, batch.attention_mask, batch.position_ids, batch.first_latent, M,
                 jacobi_iterations=iterations)
    assert len(calls) == pass_count(M, iterations) == (M + 1 if iterations is None else iterations + 2)
    assert pass_count(0) == 1
