"""The rows a pretrained model gains for the latent tokens: mean-resizing, or Coconut's copy of `<<`."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.engine.build_model import build_lm, new_rows_like, seed_new_rows
from pipeline.engine.checkpoint import COMPLETE
from pipeline.engine.config import load_config, save_config

pytestmark = pytest.mark.unit
OLD, NEW, LIKE = 300, 305, 7
ROWS = list(range(OLD, NEW))                # the latent tokens' ids: the rows the resize added


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A saved 'pretrained' LLaMA with untied embeddings, so both tables are checked."""
    cfg = LlamaConfig(vocab_size=OLD, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("pretrained")
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def _run(pretrained, *overrides):
    return load_config(None, [f"model.name_or_path={pretrained}", "method.name=coconut", *overrides])


def _tables(lm):
    return lm.get_input_embeddings().weight, lm.get_output_embeddings().weight


def test_coconut_rows_start_as_the_source_tokens_in_both_tables(pretrained):
    run = _run(pretrained)
    lm = build_lm(run.model, NEW, "sdpa")
    before = [t[:OLD].clone() for t in _tables(lm)]
    assert seed_new_rows(run, ROWS, LIKE, lm) == ROWS
    for table, old in zip(_tables(lm), before):
        assert torch.equal(table[OLD:], table[LIKE].expand(NEW - OLD, -1))
        assert torch.equal(table[:OLD], old)                             # the pretrained rows untouched


def test_latent_tokens_inside_a_padded_table_are_seeded_too(pretrained):
    """A pretrained table larger than its tokenizer (Qwen-style padding) gets no new rows: the
    latent tokens take padding ids, which are the rows to seed."""
    run = _run(pretrained)
    lm = build_lm(run.model, OLD - 10, "sdpa")                       # no resize: the tokenizer is smaller
    padded = [OLD - 12, OLD - 11]
    assert seed_new_rows(run, padded, LIKE, lm) == padded
    assert all(torch.equal(t[padded], t[LIKE].expand(2, -1)) for t in _tables(lm))


def test_other_methods_and_latent_sources_keep_mean_resizing(pretrained, tmp_path):
    class Tok:
        def __call__(self, text, add_special_tokens):
            return {"input_ids": [LIKE] if text == "<<" else [1, 2]}

    assert new_rows_like(Tok(), "coconut") == LIKE and new_rows_like(Tok(), "codi") is None
    # init_from a Coconut run: its latent rows were trained, so they are not overwritten
    tag = tmp_path / "coco" / "checkpoints" / "epoch0"
    tag.mkdir(parents=True)
    (tag / COMPLETE).write_text("{}")
    save_config(_run(pretrained), str(tmp_path / "coco" / "config.yaml"))
    run = _run(pretrained, f"checkpoint.init_from={tag}")
    lm = build_lm(run.model, NEW, "sdpa")
    rows = _tables(lm)[0][OLD:].clone()
    assert seed_new_rows(run, ROWS, LIKE, lm) == [] and torch.equal(_tables(lm)[0][OLD:], rows)
    # ... while a CoT run never fed them: they start from `<<` as the reference's Coconut stage does
    save_config(_run(pretrained, "method.name=cot"), str(tmp_path / "coco" / "config.yaml"))
    assert seed_new_rows(run, ROWS, LIKE, lm) == ROWS


def test_the_step_decoder_is_the_bases_starting_weights_without_the_added_rows():
    """A decoder built in code: the base's weights (the same build), its tables cut to the original
    vocabulary (the reference's unresized decoder); a base's weights load into it row-cut."""
    from pipeline.engine.build_model import build_step_decoder
    from pipeline.engine.checkpoint import CheckpointError, load_exact

    run = load_config(None, ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
                             "model.tiny.tie_word_embeddings=false"])
    base = build_lm(run.model, 100, "sdpa")
    decoder = build_step_decoder(run.model, 100, 95, "sdpa")
    assert decoder.config.vocab_size == 95 and decoder.get_output_embeddings().weight.shape[0] == 95
    base_state, own = base.state_dict(), decoder.state_dict()
    for name, value in own.items():
        assert torch.equal(value, base_state[name][:95] if value.shape != base_state[name].shape else base_state[name])
    with pytest.raises((CheckpointError, RuntimeError)):
        load_exact(decoder, base_state, "base")
    load_exact(decoder, {k: v + 1 for k, v in base_state.items()}, "base", cut_vocab_rows=True)
    assert torch.equal(decoder.get_input_embeddings().weight, base.get_input_embeddings().weight[:95] + 1)
