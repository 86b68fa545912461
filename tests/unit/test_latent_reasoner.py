"""LatentReasoner on tiny LLaMA configs: losses, checkpointing equality, ZeRO-3-safe call order."""
import pytest
import torch

from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import MethodConfig, layout
from pipeline.latent.reasoner import LatentReasoner
from tests.tiny_models import tiny_llama
from tests.toy_records import RECORDS
from tests.toy_records import SPECIAL as SP

pytestmark = pytest.mark.unit
NO_STEPS = [{"question_ids": [1, 19, 18], "step_ids": [], "answer_ids": [60, 61, 65], "teacher_cot_ids": [],
             "cot_ids": []}] * 3
METHODS = {
    "cot": (MethodConfig("cot"), 0),
    "coconut": (MethodConfig("coconut", c_thought=2, max_latent_stage=3), 2),
    "coconut+simcot": (MethodConfig("coconut", c_thought=2, max_latent_stage=3, simcot=True), 4),
    "codi+simcot": (MethodConfig("codi", num_latent=3, simcot=True), 0),
    "pause": (MethodConfig("pause", num_latent=3), 0),
    "coconut+simcot+jacobi": (MethodConfig("coconut", c_thought=2, max_latent_stage=3, simcot=True,
                                           latent_update="jacobi", jacobi_iterations=2), 4),
    "codi+simcot+jacobi": (MethodConfig("codi", num_latent=3, simcot=True, latent_update="jacobi",
                                        jacobi_iterations=2), 0),
}


def _batch(records, cfg, stage):
    return collate_aligned([layout(r, SP, cfg, stage, prefix_ids=[60, 61]) for r in records], SP["latent"], 0)


def _model(cfg, gradient_checkpointing=False, **kw):
    return LatentReasoner(tiny_llama(100), cfg.replace(**kw), eos_id=SP["eos"],
                          gradient_checkpointing=gradient_checkpointing)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_returns_named_finite_losses(name):
    cfg, stage = METHODS[name]
    losses = _model(cfg)(_batch(RECORDS, cfg, stage))
    assert {"answer_ce", "teacher_ce", "distill", "step_ce", "total"} <= set(losses)
    assert ("latent_cosine" in losses) == (name not in ("cot", "pause"))
    assert all(torch.isfinite(v) for v in losses.values())
    assert (losses["step_ce"] > 0) == ("simcot" in name)
    assert (losses["teacher_ce"] > 0) == name.startswith("codi")


@pytest.mark.parametrize("name", ["coconut+simcot", "codi+simcot", "codi+simcot+jacobi"])
def test_checkpointing_through_latent_passes_changes_nothing(name):
    cfg, stage = METHODS[name]
    batch = _batch(RECORDS, cfg, stage)
    results = []
    for use in (False, True):
        model = _model(cfg, gradient_checkpointing=use)
        losses = model(batch)
        losses["total"].backward()
        results.append((losses, [p.grad for p in model.parameters()]))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    for key in plain:
        assert abs(plain[key].item() - ckpt[key].item()) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(plain_grads, ckpt_grads) if a is not None) <= 1e-5


@pytest.mark.parametrize("name", METHODS)
def test_module_calls_do_not_depend_on_the_data(name):
    """ZeRO-3: the same modules in the same order on every batch, steps or no steps."""
    cfg, stage = METHODS[name]
    model = _model(cfg)
    calls = []
    hooks = [m.register_forward_hook(lambda mod, *_, n=n: calls.append(n)) for n, m in model.named_modules() if n]
    sequences = []
    for records in (RECORDS, NO_STEPS, RECORDS[1:]):
        calls.clear()
        model(_batch(records, cfg, stage))["total"].backward()
        sequences.append(list(calls))
    for h in hooks:
        h.remove()
    assert sequences[0] == sequences[1] == sequences[2]


def test_pause_tokens_are_one_plain_forward_over_the_token_embeddings():
    cfg, stage = METHODS["pause"]
    model = _model(cfg)
    batch = _batch(RECORDS, cfg, stage)
    assert (batch.input_ids == SP["latent"]).sum(1).tolist() == [3, 3, 3]
    plain = model.base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
    expected = torch.nn.functional.cross_entropy(plain[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
    assert abs(model(batch)["answer_ce"].item() - expected.item()) <= 1e-6


@pytest.mark.parametrize("missing", ["teacher_labels", "step_ids", "distill_index"])
def test_a_batch_without_a_part_its_method_needs_is_refused(missing):
    cfg, stage = METHODS["codi+simcot"]
    batch = _batch(RECORDS, cfg, stage)
    with pytest.raises(KeyError, match=f"codi batch lacks \\['{missing}'\\]"):
        _model(cfg)(batch._replace(**{missing: None}))


def test_latents_are_fed_as_hidden_states_not_token_embeddings():
    cfg, stage = METHODS["coconut"]
    model = _model(cfg)
    batch = _batch(RECORDS, cfg, stage)
    before = model(batch)["answer_ce"].item()
    with torch.no_grad():
        model.base.get_input_embeddings().weight[SP["latent"]] += 10.0   # latent token embedding unused
    assert model(batch)["answer_ce"].item() == pytest.approx(before, abs=1e-6)


def test_step_decoder_starts_from_the_base_weights_and_is_separate():
    model = _model(METHODS["codi+simcot"][0])
    for (name, p), (_, q) in zip(model.base.named_parameters(), model.step_decoder.named_parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name


def test_step_loss_normalisation_is_a_switch():
    cfg, stage = METHODS["coconut+simcot"]
    batch = _batch(RECORDS, cfg, stage)
    mean = _model(cfg)(batch)["step_ce"].item()
    summed = _model(cfg, step_loss_norm="sample_sum")(batch)["step_ce"].item()
    assert summed > 1.5 * mean        # a per-sample token sum: several tokens per step


def test_batched_codi_answer_loss_equals_the_token_weighted_per_sample_losses():
    cfg, _ = METHODS["codi+simcot"]
    model = _model(cfg).eval()
    with torch.no_grad():
        together = model(_batch(RECORDS, cfg, 0))["answer_ce"].item()
        alone = [model(_batch([r], cfg, 0))["answer_ce"].item() for r in RECORDS]
    assert together == pytest.approx(sum(alone) / 3, abs=1e-5)     # 4 labelled tokens in every row


def test_checkpointing_really_replays_layers_in_backward():
    cfg, stage = METHODS["coconut+simcot"]
    batch = _batch(RECORDS, cfg, stage)
    counts = []
    for use in (False, True):
        model = _model(cfg, gradient_checkpointing=use).train()
        calls = []
        for lm in (model.base, model.step_decoder):     # the decoder too, though its dropout is off
            lm.model.layers[0].self_attn.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        model(batch)["total"].backward()
        counts.append(len(calls))
    assert counts[1] == 2 * counts[0]          # every pass's layer ran again during backward


@pytest.mark.parametrize("name,first,dropout", [("coconut+simcot", 1, False), ("codi+simcot", 0, True)])
def test_the_step_decoder_reads_the_references_positions_and_mode(name, first, dropout):
    """Coconut's reference decoder reads positions 1..L and stays in eval mode while training
    (its wrapper's train() toggles only the base); CODI's reads 0..L-1 and trains with dropout."""
    cfg, stage = METHODS[name]
    model = _model(cfg).train()
    seen = []
    model.step_decoder.get_decoder().rotary_emb.register_forward_pre_hook(     # the positions, whatever the forward
        lambda _m, _a, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True)
    model(_batch(RECORDS, cfg, stage))
    assert seen[0][:, 0].eq(first).all() and seen[0][0].tolist() == list(range(first, first + seen[0].size(1)))
    from transformers.modeling_layers import GradientCheckpointingLayer

    modules = [m for m in model.step_decoder.modules() if not isinstance(m, GradientCheckpointingLayer)]
    assert model.base.training and all(m.training == dropout for m in modules)      # no dropout anywhere
    assert all(m.training for m in model.step_decoder.modules() if isinstance(m, GradientCheckpointingLayer))
    assert not any(m.training for m in model.eval().step_decoder.modules())


def test_distillation_is_smooth_l1_or_l2_over_the_teachers_std_per_layer():
    from pipeline.latent.reasoner import distill_loss

    target = torch.tensor([[[0.0, 2.0]], [[1.0, 1.0]]])            # [L+1=2, B=1, d=2]
    student = target + torch.tensor([[[0.5, -3.0]], [[0.0, 0.0]]])
    smooth = (0.5 * 0.5 ** 2 + (3.0 - 0.5)) / 2                     # SmoothL1, beta 1, layer 0
    std0 = torch.tensor([0.0, 2.0]).std().item()
    assert distill_loss(student, target, "smooth_l1", div_std=False).item() == pytest.approx(smooth / 2)
    assert distill_loss(student, target, "l2", div_std=False).item() == pytest.approx((0.25 + 9.0) / 2 / 2)
    assert distill_loss(student[:1], target[:1], "smooth_l1").item() == pytest.approx(smooth / std0)
    assert distill_loss(student[:1], target[:1], "l2").item() == pytest.approx((0.25 + 9.0) / 2 / std0 ** 2)


def test_the_projection_options_keep_its_checkpoint_keys():
    from pipeline.latent.reasoner import Projection

    plain, options = Projection(8), Projection(8, inner=16, dropout=0.5, layernorm=False)
    assert set(options.state_dict()) == set(plain.state_dict()) - {"3.weight", "3.bias"}
    assert options[0].weight.shape == (16, 8) and isinstance(options[3], torch.nn.Identity)
    x = torch.randn(4, 8)
    assert torch.equal(options.eval()(x), options(x))                 # no dropout in eval mode
    assert not torch.equal(options.train()(x), options(x))            # dropout on the input in training
    cfg, _ = METHODS["codi+simcot"]
    model = LatentReasoner(tiny_llama(100), cfg.replace(prj_dim=48, prj_layernorm=False), eos_id=2)
    assert model.projection[0].weight.shape == (48, model.base.config.hidden_size)


def test_a_step_decoder_of_another_width_reads_the_latents_through_a_learned_map():
    """model.decoder_path (the reference's decoder-size ablation): a narrower decoder, pj_in between."""
    cfg = MethodConfig("codi", num_latent=3, simcot=True)
    model = LatentReasoner(tiny_llama(100, hidden=32), cfg, eos_id=SP["eos"],
                           step_decoder=tiny_llama(100, hidden=16, layers=1, seed=1))
    assert (model.decoder_in.in_features, model.decoder_in.out_features) == (32, 16)
    losses = model(_batch(RECORDS, cfg, 0))
    losses["total"].backward()
    assert losses["step_ce"] > 0 and model.decoder_in.weight.grad.abs().sum() > 0
    assert model.base.get_input_embeddings().weight.grad.abs().sum() > 0
    assert _model(cfg).decoder_in is None                       # the same width: no map (the reference's Identity)
    with pytest.raises(ValueError, match="vocabulary .* is not the base tokenizer's"):
        LatentReasoner(tiny_llama(100), cfg, step_decoder=tiny_llama(120))


def test_the_recipe_switch_builds_the_other_decoder():
    from pipeline.engine.build_model import build_reasoner
    from pipeline.engine.config import load_config
    from pipeline.latent.vocab import Vocab

    run = load_config(None, ["method.name=codi", "method.simcot=true", "model.tiny.hidden_size=32",
                             "model.decoder_path=tiny", "model.decoder_tiny.hidden_size=16",
                             "model.decoder_tiny.num_layers=1", "model.decoder_tiny.intermediate_size=32"])
    model, _, _ = build_reasoner(run, Vocab(SP, 100, 95), None, on_cuda=False)
    assert model.step_decoder.config.hidden_size == 16 and model.decoder_in.out_features == 16
    assert model.base.config.hidden_size == 32
    assert model.step_decoder.config.vocab_size == 95          # the original vocabulary: no added token's row


def test_the_collators_label_index_selects_what_the_boolean_mask_selects():
    """The host-side index (no device sync on a GPU) gives the boolean mask's losses and gradients."""
    cfg, _ = METHODS["codi+simcot"]
    batch = _batch(RECORDS, cfg, 0)
    assert batch.label_index is not None and batch.teacher_label_index is not None
    results = []
    for b in (batch, batch._replace(label_index=None, teacher_label_index=None)):
        model = _model(cfg)
        losses = model(b)
        losses["total"].backward()
        results.append((losses, [p.grad for p in model.parameters() if p.grad is not None]))
    (indexed, indexed_grads), (masked, masked_grads) = results
    for key in ("answer_ce", "teacher_ce", "total"):
        assert torch.equal(indexed[key], masked[key])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(indexed_grads, masked_grads))


def test_a_decoder_copied_here_can_have_the_original_vocabulary():
    cfg = MethodConfig("codi", num_latent=3, simcot=True)
    model = LatentReasoner(tiny_llama(100), cfg, eos_id=SP["eos"], decoder_vocab=95)
    table = model.step_decoder.get_output_embeddings().weight
    assert table.shape[0] == 95 and torch.equal(table, model.base.get_output_embeddings().weight[:95])
    assert model(_batch(RECORDS, cfg, 0))["step_ce"] > 0
