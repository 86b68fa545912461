"""CODI distils at the token right before the first answer token, found from the tokenizer."""
import pytest
from transformers import AutoTokenizer

from data_prep.tokenizer import corpus_texts
from pipeline.latent.methods.codi import answer_start
from tests.local_tokenizers import llama3_style_bpe

pytestmark = pytest.mark.unit
PREFIX = "The answer is: "


def _positions(tok, answer):
    ids = tok(PREFIX + answer, add_special_tokens=False)["input_ids"]
    start = answer_start(ids, tok(PREFIX, add_special_tokens=False)["input_ids"])
    return tok.convert_ids_to_tokens(ids), start


def test_sentencepiece_distils_at_the_space_piece(spm_tokenizer_dir):
    tokens, start = _positions(AutoTokenizer.from_pretrained(spm_tokenizer_dir), "18")
    assert tokens[start:] == ["1", "8"] and tokens[start - 1] == "▁"


def test_llama3_style_bpe_distils_at_the_lone_space(synth_dir):
    texts = corpus_texts([str(synth_dir / "train.txt")]) + [f"{PREFIX}{n}" for n in range(300)]
    tokens, start = _positions(llama3_style_bpe(texts), "18")
    assert tokens[start] == "18" and tokens[start - 1] == "Ġ"        # LLaMA-3: " " then "18"
    tokens, start = _positions(llama3_style_bpe(texts), "-4")
    assert tokens[start - 1:] == ["Ġ", "-", "4"]                       # negative answers too
