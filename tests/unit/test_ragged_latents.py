"""Rows of one batch with different latent counts (Coconut's ``pad_latent_to_max: false`` and
``uniform_prob``), filled row by row as the reference fills them: each row computes exactly what it
computes alone, the passes are the stage's (ZeRO-3 lockstep), generation matches one prompt at a time."""
import dataclasses

import pytest
import torch

from pipeline.engine.config import ConfigError, load_config
from pipeline.engine.sampler import example_stage, iter_batches
from pipeline.inference.generate import latent_generate
from pipeline.inference.merged import prompt_for
from pipeline.latent.collate import collate_aligned
from pipeline.latent.loop import fill_latents
from pipeline.latent.methods import MethodConfig, layout
from pipeline.latent.reasoner import LatentReasoner, Projection
from tests.tiny_models import tiny_llama
from tests.toy_records import RECORDS
from tests.toy_records import SPECIAL as SP

pytestmark = pytest.mark.unit
L = SP["latent"]
# after the last stage, without pad_latent_to_max: min(steps, 3) x c latents -> 3, 1 and 2 for RECORDS
RAGGED = MethodConfig("coconut", c_thought=1, max_latent_stage=3, pad_latent_to_max=False, simcot=True)
FINAL = 4


def _examples(cfg=RAGGED, stages=(FINAL, FINAL, FINAL), records=RECORDS):
    return [layout(r, SP, cfg, s) for r, s in zip(records, stages)]


def _batch(examples, span):
    return collate_aligned(examples, L, SP["pad"], latent_span=span)


def test_collate_aligns_the_first_latent_and_counts_each_rows_latents():
    examples = _examples(stages=(FINAL, FINAL, 0))            # the last row: no latents (stage 0)
    batch = _batch(examples, 3)
    assert [e.n_latents for e in examples] == [3, 1, 0]
    assert batch.n_latents == 3 and batch.latent_counts.tolist() == [3, 1, 0]
    ids = batch.input_ids.tolist()
    assert ids[0][batch.first_latent:batch.first_latent + 3] == [L] * 3
    assert ids[1][batch.first_latent:batch.first_latent + 2] == [L, SP["end_latent"]]
    assert ids[2][:len(examples[2].input_ids)] == examples[2].input_ids       # not shifted (the reference's)
    assert batch.latent_mask().tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert batch.step_lengths.tolist() == [[5, 4, 9], [4, 0, 0], [0, 0, 0]]   # fewer slots: masked ones
    wide = _batch(examples[1:2], 6)                           # the stage's span exceeds the row: columns exist
    assert wide.input_ids.size(1) >= wide.first_latent + 6 and wide.latent_counts.tolist() == [1]
    with pytest.raises(ValueError, match="latent_span"):
        collate_aligned(examples, L, SP["pad"])
    with pytest.raises(ValueError, match="more than the batch's latent_span 2"):
        _batch(examples, 2)
    assert _batch(_examples(), 3).latent_counts is not None and _batch(examples[:1], 3).latent_counts is None


def _logits(model, batch, jacobi=None):
    """Every column's logits and the latents, filling as LatentReasoner does."""
    embeds = model.get_input_embeddings()(batch.input_ids)
    passes = fill_latents(model.get_decoder(), embeds, batch.attention_mask, batch.position_ids, batch.first_latent,
                          batch.n_latents, jacobi_iterations=jacobi, latent_mask=batch.latent_mask())
    return model.get_output_embeddings()(passes.hidden), passes.latents


@pytest.mark.parametrize("jacobi", [None, 2])
@torch.no_grad()
def test_each_row_of_a_mixed_batch_computes_what_it_computes_alone(jacobi):
    model = tiny_llama(100, hidden=64, seed=1).eval()
    examples = _examples(stages=(FINAL, FINAL, 2))           # 3, 1 and 2 latents
    for span in (3, 5):                                      # the batch's maximum, and a stage's larger one
        batch = _batch(examples, span)
        logits, latents = _logits(model, batch, jacobi)
        for row, example in enumerate(examples):
            alone = _batch([example], example.n_latents)
            assert alone.latent_counts is None
            alone_logits, alone_latents = _logits(model, alone, jacobi)
            mine = logits[row][batch.attention_mask[row].bool()]
            assert (mine - alone_logits[0]).abs().max().item() <= 1e-5
            count = example.n_latents
            assert (latents[row, :count] - alone_latents[0]).abs().max().item() <= 1e-5


def test_the_losses_of_a_mixed_batch_do_not_depend_on_the_passes_beyond_its_rows():
    """More latent passes than any row holds (the stage's maximum on another rank) change no loss:
    the extra columns are tokens, the extra decoder slots masked."""
    model = LatentReasoner(tiny_llama(100, hidden=64, seed=2), RAGGED, eos_id=SP["eos"]).eval()
    examples = _examples(stages=(FINAL, FINAL, 1))
    with torch.no_grad():
        tight, wide = model(_batch(examples, 3)), model(_batch(examples, 5))
        alone = [model(_batch([e], e.n_latents))["answer_ce"] for e in examples]
    for key in ("answer_ce", "step_ce", "total"):
        assert tight[key].item() == pytest.approx(wide[key].item(), abs=1e-5)
    labelled = [sum(t != -100 for t in e.labels[1:]) for e in examples]
    weighted = sum(n * a for n, a in zip(labelled, alone)) / sum(labelled)
    assert tight["answer_ce"].item() == pytest.approx(weighted.item(), abs=1e-5)
    assert tight["step_ce"].item() > 0


def test_every_batch_of_a_stage_makes_the_same_module_calls_whatever_its_rows_hold():
    """ZeRO-3 lockstep: with uniform_prob, a batch whose rows drew no latents at all runs the stage's
    passes and the step decoder like any other."""
    cfg = MethodConfig("coconut", c_thought=1, max_latent_stage=3, simcot=True, uniform_prob=0.5)
    model = LatentReasoner(tiny_llama(100, hidden=64), cfg, eos_id=SP["eos"])
    calls = []
    hooks = [m.register_forward_hook(lambda mod, *_, n=n: calls.append(n)) for n, m in model.named_modules() if n]
    span = cfg.latent_span(1)
    sequences = []
    for stages in ((1, 1, 1), (0, 0, 0), (3, 0, 2)):
        calls.clear()
        model(_batch(_examples(cfg, stages), span))["total"].backward()
        sequences.append(list(calls))
    for hook in hooks:
        hook.remove()
    assert span == 3 and sequences[0] == sequences[1] == sequences[2]


def test_uniform_prob_draws_a_stage_per_example_the_same_on_every_rank_and_resume():
    cfg = MethodConfig("coconut", c_thought=1, max_latent_stage=3, uniform_prob=0.5)
    record = RECORDS[0]                                      # 4 steps: draws from 0..4
    draws = [example_stage(cfg, 2, record, "0/0", i) for i in range(400)]
    assert draws == [example_stage(cfg, 2, record, "0/0", i) for i in range(400)]
    assert draws != [example_stage(cfg, 2, record, "0/1", i) for i in range(400)]        # another epoch
    assert set(draws) == {0, 1, 2, 3, 4}
    assert 0.32 < sum(d != 2 for d in draws) / 400 < 0.48     # half drawn, 4 in 5 of those not 2: 0.4
    assert example_stage(cfg, 2, record, None, 0) == 2                        # validation: the scheduled stage
    assert example_stage(MethodConfig("coconut"), 2, record, "0/0", 0) == 2
    assert cfg.latent_span(1) == 3 and RAGGED.latent_span(FINAL) == 3 and RAGGED.latent_span(2) == 2
    batches = list(iter_batches(RECORDS, [[0, 1, 2]] * 8, SP, cfg, 1, [], draw_seed="0/0"))
    assert {b.n_latents for b in batches} == {3}


def _prompts(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(10, 90, (3 + 2 * i,), generator=g).tolist() + [SP["start_latent"]] + [L] * n
            + [SP["end_latent"]] for i, n in enumerate(counts)]


def test_generation_with_different_latent_counts_is_token_identical_to_one_prompt_at_a_time():
    model = tiny_llama(100, hidden=64, seed=3).eval()
    prompts = _prompts([3, 0, 1, 4, 2])
    batched = latent_generate(model, prompts, L, SP["eos"], 10)
    assert batched == [latent_generate(model, [p], L, SP["eos"], 10)[0] for p in prompts]
    torch.manual_seed(0)
    projection = Projection(64).eval()
    batched = latent_generate(model, prompts, L, SP["eos"], 10, project=projection, jacobi_iterations=2)
    assert batched == [latent_generate(model, [p], L, SP["eos"], 10, project=projection, jacobi_iterations=2)[0]
                       for p in prompts]


def test_evaluation_gives_each_problem_its_own_count_when_the_model_was_trained_so():
    cfg = MethodConfig("coconut", c_thought=2, max_latent_stage=3, pad_latent_to_max=False)
    latent = {"method_config": dataclasses.asdict(cfg), "stage": 4, "special_tokens": SP}
    counts = [prompt_for(r, latent).count(L) for r in RECORDS]
    assert counts == [6, 2, 4]                               # min(steps, 3) x 2, as the reference's test set
    assert prompt_for({**RECORDS[1], "step_ids": []}, latent).count(L) == 6     # answer-only: the model's count
    assert prompt_for(RECORDS[1], {**latent, "stage": 2}).count(L) == 2         # capped at every stage
    padded = {**latent, "method_config": {**latent["method_config"], "pad_latent_to_max": True}}
    assert prompt_for(RECORDS[1], padded).count(L) == 6


@pytest.mark.parametrize("override, message", [
    ("method.uniform_prob=1.5", "method.uniform_prob must be in"),
    ("method.uniform_prob=0.3", "a method with a curriculum"),
])
def test_uniform_prob_is_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override, "method.name=codi"])
    assert load_config(None, ["method.name=coconut", "method.pad_latent_to_max=false",
                              "method.uniform_prob=0.3"]).method.uniform_prob == 0.3
