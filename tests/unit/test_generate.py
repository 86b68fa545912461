"""Batched, cached latent generation equals running each problem alone and the uncached reference."""
import random

import pytest
import torch

from benchmarks.generate import reference_generate
from pipeline.inference.generate import latent_generate
from pipeline.latent.reasoner import Projection
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.unit
START, LATENT, END, BOT, EOT, EOS = 90, 91, 92, 93, 94, 2


def _prompts(markers, n_latents, seed=0, n=6):
    rng = random.Random(seed)
    opening, closing = markers
    return [[1] + [rng.randrange(10, 90) for _ in range(rng.randint(3, 15))] + [opening] + [LATENT] * n_latents
            + [closing] for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(100, hidden=64, layers=2, seed=3).eval()


def test_coconut_batched_equals_one_by_one(model):
    prompts = _prompts((START, END), 4)
    batched = latent_generate(model, prompts, LATENT, EOS, 12)
    assert batched == [latent_generate(model, [p], LATENT, EOS, 12)[0] for p in prompts]


def test_codi_batched_equals_one_by_one_with_the_projection(model):
    torch.manual_seed(0)
    projection = Projection(64).eval()
    prompts = _prompts((BOT, EOT), 3, seed=1)
    batched = latent_generate(model, prompts, LATENT, EOS, 12, project=projection)
    assert batched == [latent_generate(model, [p], LATENT, EOS, 12, project=projection)[0] for p in prompts]
    assert batched != latent_generate(model, prompts, LATENT, EOS, 12)     # the projection is really used


def test_matches_the_uncached_reference_loop(model):
    prompts = _prompts((START, END), 5, seed=2, n=3)
    assert latent_generate(model, prompts, LATENT, eos_id=-1, max_new_tokens=10) == \
        [reference_generate(model, p, LATENT, 10) for p in prompts]


def test_stops_before_eos_and_handles_prompts_without_latents(model):
    prompts = [[1, 20, 21], [1, 22, 23, 24, 25]]
    out = latent_generate(model, prompts, LATENT, EOS, 8)
    assert out == [latent_generate(model, [p], LATENT, EOS, 8)[0] for p in prompts]
    first = latent_generate(model, prompts[:1], LATENT, eos_id=-1, max_new_tokens=3)[0]
    assert latent_generate(model, prompts[:1], LATENT, eos_id=first[1], max_new_tokens=3)[0] == first[:1]


@torch.no_grad()
def test_pause_prompts_run_in_one_pass_with_the_latent_token_as_an_ordinary_token(model):
    """latent_id None (a method that fills nothing, e.g. pause): the placeholders are read as tokens."""
    prompts = _prompts((BOT, EOT), 4)
    batched = latent_generate(model, prompts, None, eos_id=-1, max_new_tokens=6)
    assert batched == [latent_generate(model, [p], None, eos_id=-1, max_new_tokens=6)[0] for p in prompts]
    for prompt, new in zip(prompts, batched):       # greedy continuation, no cache
        ids = list(prompt)
        for token in new:
            assert int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()) == token
            ids.append(token)
    assert batched != latent_generate(model, prompts, LATENT, eos_id=-1, max_new_tokens=6)   # filling differs
