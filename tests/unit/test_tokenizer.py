import pytest
from transformers import AutoTokenizer

from data_prep.templates import Templates, tokenize_problems
from data_prep.tokenizer import LATENT_TOKENS, add_latent_tokens, corpus_texts, fingerprint, special_token_ids
from tests.local_tokenizers import llama3_style_bpe

pytestmark = pytest.mark.unit
CODI = Templates(question_suffix="", step_separator=" ", answer_prefix="The answer is: ")


def _problems(synth_dir, n=100):
    rows = []
    for line in (synth_dir / "train.txt").read_text().splitlines()[:n]:
        question, _, rest = line.partition("||")
        chain, _, answer = rest.partition("####")
        rows.append((question, chain.split(), answer.strip()))
    return rows


def _piecewise_equals_whole(tok, templates, rows):
    q, s, a = tokenize_problems(tok, templates, *map(list, zip(*rows)))
    equal = []
    for (question, steps, answer), q_ids, s_ids, a_ids in zip(rows, q, s, a):
        whole = tok(templates.cot_text(question, steps, answer), add_special_tokens=True)["input_ids"]
        equal.append(q_ids + sum(s_ids, []) + a_ids == whole)
    return equal


def test_sentencepiece_round_trips_text_exactly(spm_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    text = "Ann  has 12 pens.\n<<12*3=36>>\n### 36 (é, 😀)"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    digits = [t for t in tok.convert_ids_to_tokens(tok("12*3=36", add_special_tokens=False)["input_ids"])]
    assert digits == ["1", "2", "*", "3", "=", "3", "6"]        # one token per digit


def test_latent_tokens_are_added_once_and_saved(spm_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    ids = special_token_ids(tok)
    assert set(LATENT_TOKENS) | {"bos", "eos", "pad"} == set(ids)
    assert len(set(ids.values())) == len(ids)
    before = len(tok)
    assert add_latent_tokens(tok) == ids and len(tok) == before   # idempotent
    latent = ids["latent"]
    assert tok("x<|latent|><|latent|>", add_special_tokens=False)["input_ids"][-2:] == [latent, latent]
    tok.save_pretrained(tmp_path)
    assert fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == fingerprint(tok)


def test_the_pipeline_names_the_tokens_data_prep_adds():
    """pipeline.latent keeps its own list of the added tokens' names (it reads shards, never
    data_prep's internals): the two must name the same tokens."""
    from pipeline.latent.methods.base import ADDED_TOKENS

    assert set(ADDED_TOKENS) == set(LATENT_TOKENS) | {"pad"} and len(ADDED_TOKENS) == len(LATENT_TOKENS) + 1


def test_step_ids_equal_the_explicit_cot_tokenisation_with_sentencepiece(spm_tokenizer_dir, synth_dir):
    tok = AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    rows = _problems(synth_dir)
    assert all(_piecewise_equals_whole(tok, Templates(), rows))  # "<<", ">>", "###", "\n" are atomic


def test_llama3_style_bpe_merges_across_pieces_with_space_separated_steps(synth_dir):
    """Documented difference (README "Tokenisation"): with LLaMA-3's rules a space before ``<<``
    merges into `` <<`` in the whole CoT text, so step ids tokenised apart (as Coconut/CODI do)
    differ there; with newline-separated steps they agree."""
    texts = corpus_texts([str(synth_dir / "train.txt")])
    texts += [CODI.cot_text(q, s, a) for q, s, a in _problems(synth_dir, 2000)]
    tok = llama3_style_bpe(texts)
    rows = _problems(synth_dir)
    assert all(_piecewise_equals_whole(tok, Templates(), rows))
    multi_step = [r for r in rows if len(r[1]) > 1]
    assert not any(_piecewise_equals_whole(tok, CODI, multi_step))
    assert " <<" in tok.convert_tokens_to_string(tok.tokenize(" <<1+1=2>>")) and \
        tok.tokenize(" <<1")[0] == "Ġ<<"


def test_codi_teacher_cot_is_tokenised_once_as_the_reference_does(synth_dir):
    """The reference's teacher reads ``" ".join(steps[:-1])`` tokenised as one string: with a
    byte-level BPE that holds the merged `` <<`` that per-step pieces never contain."""
    from data_prep.templates import tokenize_joined_cots

    texts = corpus_texts([str(synth_dir / "train.txt")])
    texts += [CODI.cot_text(q, s, a) for q, s, a in _problems(synth_dir, 2000)]
    tok = llama3_style_bpe(texts)
    rows = [r for r in _problems(synth_dir) if len(r[1]) > 2]
    steps = [r[1] for r in rows]
    teacher, whole = tokenize_joined_cots(tok, CODI, steps)
    _, pieces, _ = tokenize_problems(tok, CODI, *map(list, zip(*rows)))
    for chain, teacher_ids, whole_ids, piece_ids in zip(steps, teacher, whole, pieces):
        assert teacher_ids == tok(" ".join(chain[:-1]), add_special_tokens=False)["input_ids"]
        assert whole_ids == tok(" ".join(chain), add_special_tokens=False)["input_ids"]
        assert teacher_ids != sum(piece_ids[:-1], [])          # the pieces end in a lone " " and lack " <<"
        assert tok.convert_ids_to_tokens(teacher_ids).count("Ġ<<") == len(chain) - 2


def test_encode_gives_the_ids_of_the_tokenizer_call(spm_tokenizer_dir, synth_dir):
    """``templates.encode`` calls the Rust backend without token offsets: the ids of ``tok(texts)``,
    with and without special tokens, for SentencePiece and LLaMA-3-style BPE."""
    from data_prep.templates import encode

    texts = [line for line in (synth_dir / "train.txt").read_text().splitlines()[:50]]
    texts += ["", " ", "Ann  has 12 pens.\n<<12*3=36>>\n### 36 (é, 😀)", "x<|latent|> <<1+1=2>>"]
    for tok in (AutoTokenizer.from_pretrained(spm_tokenizer_dir), llama3_style_bpe(texts)):
        add_latent_tokens(tok)
        for special in (True, False):
            assert encode(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]
