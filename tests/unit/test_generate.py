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


def test_masked_classes_are_never_generated_and_the_rest_is_unchanged(model):
    """CODI's generation scores the reference's classes only (``Method.masked_classes``)."""
    prompts = _prompts((BOT, EOT), 3)
    plain = latent_generate(model, prompts, LATENT, eos_id=-1, max_new_tokens=8)
    seen = {t for row in plain for t in row}
    common = max(seen, key=lambda t: sum(row.count(t) for row in plain))
    unseen = next(t for t in range(100) if t not in seen)
    masked = latent_generate(model, prompts, LATENT, eos_id=-1, max_new_tokens=8, masked_classes=[common, unseen])
    assert all(common not in row and unseen not in row for row in masked) and masked != plain
    assert latent_generate(model, prompts, LATENT, eos_id=-1, max_new_tokens=8, masked_classes=[unseen]) == plain


def test_a_masked_class_leaves_the_loss_of_a_head_without_that_row():
    """-inf logits: the softmax over the other classes is the one a head without the row computes."""
    from pipeline.latent.reasoner import labelled_ce

    torch.manual_seed(0)
    head, hidden = torch.nn.Linear(8, 12, bias=False), torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.randint(0, 9, (2, 5))
    kept = torch.nn.Linear(8, 9, bias=False)
    kept.weight.data = head.weight.data[:9].clone()
    full = labelled_ce(head, hidden, labels, masked=torch.tensor([9, 10, 11]))
    assert torch.allclose(full, labelled_ce(kept, hidden, labels), atol=1e-6)
    full.backward()
    assert head.weight.grad[9:].abs().sum() == 0                 # no gradient reaches the masked rows
