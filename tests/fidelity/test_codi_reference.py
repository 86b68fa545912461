"""CODI + SIM-CoT with ``method.reference_quirks=true`` computes the reference's losses and gradients.

The reference side is :mod:`tests.fidelity.codi_reference` (its data handling, step extraction,
mask rule and forward, transcribed), on a tiny LLaMA with the reference's vocabulary (V + pad, bot,
eot; a step decoder of V); our side is the pipeline as a recipe configures it (``load_config``,
``run.method``, the shard fields data_prep writes, ``layout``, ``collate_aligned``) on the same
weights, with the tokenizer's added tokens as data_prep adds them. Tokenizers: a byte-level BPE with
LLaMA-3's pre-tokenizer trained here (the space merges into `` <<``, ``>>`` and a digit stay apart)
and the SentencePiece default. Rows are ragged (teacher steps 1, 3 and 7 for 4 slots; one problem
with none), row 0 the shortest, questions of different lengths (left pads); eager and SDPA.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data_prep.templates import Templates, tokenize_joined_cots, tokenize_problems
from data_prep.tokenizer import add_latent_tokens, original_vocab_size, step_marker_ids
from pipeline.engine.config import load_config
from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import get_method, layout
from pipeline.latent.methods.codi import answer_start
from pipeline.latent.reasoner import LatentReasoner
from tests.fidelity import codi_reference as ref
from tests.local_tokenizers import llama3_style_bpe

pytestmark = pytest.mark.fidelity
N = 3                                            # latents: 4 decoder slots
TEMPLATES = Templates(question_suffix="", step_separator=" ", answer_prefix="The answer is: ")
PROBLEMS = [                                     # teacher steps 1, 3, 7, 0; question lengths differ
    ("Ann has 5 pens and gets 2 more. Then she doubles them. How many?", ["<<5+2=7>>", "<<7*2=14>>"], "14"),
    ("A farm has 12 cows, 30 hens and 4 dogs. Each cow eats 3 bales, each hen 1 scoop. The dogs eat half "
     "as much as the cows. How many bales and scoops are eaten in all?",
     ["<<12*3=36>>", "<<30*1=30>>", "<<36/2=18>>", "<<36+30+18=84>>"], "84"),
    ("Gus packs 8 boxes of 6 cards, adds 7, takes 3 away, splits them in 2, keeps one, buys 9, gives "
     "4 away, then doubles what he has. How many cards?",
     ["<<8*6=48>>", "<<48+7=55>>", "<<55-3=52>>", "<<52/2=26>>", "<<26+9=35>>", "<<35-4=31>>",
      "<<31*2=62>>", "<<62+0=62>>"], "62"),
    ("Kai has 9 coins and finds 4 more. How many coins?", ["<<9+4=13>>"], "13"),
]


@pytest.fixture(scope="module")
def bpe():
    texts = [q + "||" + " ".join(s) + " #### " + a for q, s, a in PROBLEMS] * 20
    tok = llama3_style_bpe(texts + ["The answer is: 14 84 62 13 0 1 2 3 4 5 6 7 8 9"] * 20, vocab_size=420)
    return tok, original_vocab_size_before(tok)


@pytest.fixture(scope="module")
def spm(spm_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    return tok, original_vocab_size(tok)


def original_vocab_size_before(tok) -> int:
    size = len(tok)
    add_latent_tokens(tok)
    assert original_vocab_size(tok) == size
    return size


def reference_ids(tok, v: int) -> ref.ReferenceIds:
    markers = step_marker_ids(tok)
    pad = tok.pad_token_id if tok.pad_token_id < v else v   # the reference adds [PAD] at V where there is none
    return ref.ReferenceIds(tok.bos_token_id, tok.eos_token_id, pad, v + 1, v + 2,
                            tuple(markers[k] for k in ("step_open", "step_open_spaced") if k in markers),
                            markers["step_close"])


def records(tok):
    questions, steps, answers = zip(*PROBLEMS)
    q_ids, s_ids, a_ids = tokenize_problems(tok, TEMPLATES, list(questions), list(steps), list(answers))
    teacher, full = tokenize_joined_cots(tok, TEMPLATES, list(steps))
    return [{"question_ids": q, "step_ids": s, "answer_ids": a, "teacher_cot_ids": t, "cot_ids": c}
            for q, s, a, t, c in zip(q_ids, s_ids, a_ids, teacher, full)]


def tiny(vocab: int, attention: str, seed: int) -> LlamaForCausalLM:
    """Weights drawn with std 0.3, not 0.02: attention far from uniform, as in a trained model (at
    0.02 every score is near 0, and a pad row's average over all columns barely differs from any other)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, attn_implementation=attention, initializer_range=0.3)
    return LlamaForCausalLM(cfg).float().eval()


def row_map(tok, v: int, special: dict) -> dict[int, int]:
    """Our base's rows -> the reference's: the original vocabulary, then pad, bot, eot. Where the
    tokenizer has its own pad the reference's row V is a class no token uses; our start-latent row
    (never an input or a target) stands for it."""
    rows = {i: i for i in range(v)} | {special["bot"]: v + 1, special["eot"]: v + 2}
    rows[special["pad"] if special["pad"] >= v else special["start_latent"]] = v
    return rows


def load_mapped(ours, theirs, rows: dict[int, int]) -> None:
    """Every weight copied; the token tables row by row (our other rows keep their random values)."""
    tables = {"model.embed_tokens.weight", "lm_head.weight"}
    state, own = theirs.state_dict(), ours.state_dict()
    with torch.no_grad():
        for name, value in own.items():
            if name in tables:
                value[list(rows)] = state[name][list(rows.values())]
            else:
                value.copy_(state[name])


def projection(ours, with_ln: bool):
    """The reference's prj (Dropout, Linear, GELU, Linear[, LayerNorm]) with our projection's weights."""
    layers = [torch.nn.Dropout(0.0), *copy.deepcopy(list(ours)[:3])]
    return torch.nn.Sequential(*layers, copy.deepcopy(ours[3])) if with_ln else torch.nn.Sequential(*layers)


def build(tok, v: int, attention: str, overrides: list[str], seed: int = 0):
    """-> (our model, our batch, the reference's modules, its batch, its settings)."""
    run = load_config(None, ["method.name=codi", "method.simcot=true", "method.reference_quirks=true",
                             f"method.num_latent={N}", *overrides])
    special = {**add_latent_tokens(tok), **step_marker_ids(tok)}
    method, rid = get_method("codi"), reference_ids(tok, v)
    theirs, decoder = tiny(v + 3, "sdpa", seed), tiny(v, "sdpa", seed + 1)
    rows = row_map(tok, v, special)
    masked = [i for i in method.masked_classes(special, v) if i not in rows]
    base = tiny(len(tok), attention, seed + 2)
    load_mapped(base, theirs, rows)
    our_decoder = tiny(v, attention, seed + 1)
    model = LatentReasoner(base, run.method, eos_id=special["eos"], step_decoder=our_decoder,
                           masked_classes=masked).eval()
    prj = projection(model.projection, run.method.prj_layernorm) if model.projection is not None else None
    prefix = tok(TEMPLATES.answer_prefix, add_special_tokens=False)["input_ids"]
    examples = [layout(r, special, run.method, 0, prefix) for r in records(tok)]
    batch = collate_aligned(examples, special["latent"], special["pad"])
    # the reference shifts its distillation position by one on "llama" paths, where a lone space
    # token precedes the answer's digits: so does this tokenizer when the answer starts one later
    prompt = tok(ref.ANSWER_PROMPT, add_special_tokens=False)["input_ids"]
    llama = answer_start(records(tok)[0]["answer_ids"], prefix) == len(prompt) + 1
    theirs_batch = ref.collate(ref.preprocess(tok, PROBLEMS, rid, run.method.remove_eos, llama), rid.pad)
    settings = ref.Settings(N, run.method.distill_factor, run.method.distill_loss, run.method.distill_div_std)
    return model, batch, (theirs, decoder, prj or (lambda x: x)), theirs_batch, settings, rid, rows


def run_both(tok, v, attention, overrides):
    model, batch, (theirs, decoder, prj), their_batch, settings, rid, rows = build(tok, v, attention, overrides)
    ours = model(batch)
    ours["total"].backward()
    expected = ref.forward(theirs, decoder, prj, their_batch, rid, settings)
    expected["total"].backward()
    return model, ours, (theirs, decoder, prj), expected, rows


def grads_match(model, theirs, decoder, prj, rows) -> float:
    """The largest gradient difference over every tensor (base, projection, step decoder), relative
    to that tensor's largest gradient."""
    pairs = [(dict(model.step_decoder.named_parameters()), dict(decoder.named_parameters()), None),
             (dict(model.base.named_parameters()), dict(theirs.named_parameters()), rows)]
    if model.projection is not None:          # ours: 0, 2, 3; the reference's: 1, 3, 4 (after its Dropout)
        theirs_prj = {k: p for k, p in prj.named_parameters()}
        pairs.append(({f"{int(k[0]) + 1}{k[1:]}": p for k, p in model.projection.named_parameters()}, theirs_prj, None))
    worst = 0.0
    for mine, their, mapping in pairs:
        assert set(mine) == set(their)
        for name, param in their.items():
            got, want = mine[name].grad, param.grad
            assert (got is None) == (want is None), name
            if want is None:                  # the decoder's own input table: it reads the base's embeddings
                continue
            if mapping is not None and name in ("model.embed_tokens.weight", "lm_head.weight"):
                got, want = got[list(mapping)], want[list(mapping.values())]
            worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item())
    return worst


CASES = {
    "smooth_l1": [],
    "l2 + prj without LayerNorm": ["method.distill_loss=l2", "method.prj_layernorm=false"],
    "no projection, distill x20": ["method.projection=false", "method.distill_factor=20.0"],
}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_losses_and_gradients_are_the_references(which, case, attention, request):
    tok, v = request.getfixturevalue(which)
    model, ours, (theirs, decoder, prj), expected, rows = run_both(tok, v, attention, CASES[case])
    for term in ("answer_ce", "teacher_ce", "distill", "step_ce", "total"):
        assert abs(ours[term].item() - expected[term].item()) <= 1e-5 * max(1.0, abs(expected[term].item())), term
    assert expected["step_ce"].item() > 0
    assert grads_match(model, theirs, decoder, prj, rows) <= 1e-4


def test_with_eos_after_the_question_the_reference_has_no_step_loss(bpe):
    """``remove_eos: false`` puts EOS after the question; the reference's step scan stops there."""
    tok, v = bpe
    _, ours, _, expected, _ = run_both(tok, v, "sdpa", ["method.remove_eos=false"])
    assert expected["step_ce"].item() == 0 and ours["step_ce"].item() == 0
    for term in ("answer_ce", "teacher_ce", "distill", "total"):
        assert abs(ours[term].item() - expected[term].item()) <= 1e-5 * max(1.0, abs(expected[term].item())), term
    model, *_ = build(tok, v, "sdpa", ["method.remove_eos=false", "method.reference_quirks=false"])
    with torch.no_grad():
        assert model(collate_for(model, tok))["step_ce"].item() > 0        # fixed: the CoT is scanned


def collate_for(model, tok):
    run = load_config(None, ["method.name=codi", "method.simcot=true", f"method.num_latent={N}",
                             "method.remove_eos=false"])
    special = {**add_latent_tokens(tok), **step_marker_ids(tok)}
    prefix = tok(TEMPLATES.answer_prefix, add_special_tokens=False)["input_ids"]
    return collate_aligned([layout(r, special, run.method, 0, prefix) for r in records(tok)],
                           special["latent"], special["pad"])


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_the_step_targets_are_the_references_spans(which, request):
    """Our targets (before the decoder appends EOS) are the reference's ``get_steps`` without its
    terminators: the ``<<``..``>>`` spans of the teacher ids, the merged `` <<`` included, no
    separator token, the overflow merged into the last slot."""
    tok, v = request.getfixturevalue(which)
    rid = reference_ids(tok, v)
    special = {**add_latent_tokens(tok), **step_marker_ids(tok)}
    prefix = tok(TEMPLATES.answer_prefix, add_special_tokens=False)["input_ids"]
    theirs = ref.get_steps([r["ref"] for r in ref.preprocess(tok, PROBLEMS, rid)], N + 1, rid)
    for quirks in (True, False):
        cfg = load_config(None, ["method.name=codi", "method.simcot=true", f"method.num_latent={N}",
                                 f"method.reference_quirks={str(quirks).lower()}"]).method
        ours = [layout(r, special, cfg, 0, prefix).step_targets for r in records(tok)]
        assert ours == [[s[:-1] if s != [rid.pad] else [] for s in row] for row in theirs]
    pieces = load_config(None, ["method.name=codi", "method.simcot=true", f"method.num_latent={N}",
                                "method.step_targets=pieces"]).method
    assert [layout(r, special, pieces, 0, prefix).step_targets for r in records(tok)] != ours
    if which == "bpe":                       # the byte-level BPE merges the space into later steps' bracket
        assert ours[1][1][0] == special["step_open_spaced"] and ours[1][0][0] == special["step_open"]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_without_the_pad_row_rule_the_answer_loss_moves_off_the_references(bpe, attention, monkeypatch):
    """The check can fail: with the question's 2-D mask as today's transformers turns it into a 4-D
    one (SDPA: a left pad's row comes out as zeros; eager: a uniform average), the left-padded
    rows' answer loss moves off the reference's."""
    import pipeline.latent.reference_quirks

    tok, v = bpe
    model, batch, (theirs, decoder, prj), their_batch, settings, rid, _ = build(tok, v, attention, [])
    monkeypatch.setattr(pipeline.latent.reference_quirks, "pad_rows_attend_all", lambda mask, dtype: mask)
    with torch.no_grad():
        expected = ref.forward(theirs, decoder, prj, their_batch, rid, settings)["answer_ce"].item()
        assert abs(model(batch)["answer_ce"].item() - expected) > 1e-3


GOLDEN = Path(__file__).with_name("codi_reference_golden.json")


def reference_losses(tok, v: int, overrides: list[str]) -> dict[str, float]:
    _, _, (theirs, decoder, prj), their_batch, settings, rid, _ = build(tok, v, "sdpa", overrides)
    with torch.no_grad():
        return {k: round(t.item(), 6) for k, t in ref.forward(theirs, decoder, prj, their_batch, rid, settings).items()}


def test_the_transcription_gives_its_recorded_losses(bpe, spm):
    """The reference's side, pinned: the losses the transcription computed when it was written
    (``UPDATE_GOLDEN=1`` rewrites the file, for a deliberate change of the transcription or of the
    pinned torch), so a change to it is never silent and both sides cannot drift together."""
    got = {f"{which}/{case}": reference_losses(*tok_v, CASES[case])
           for which, tok_v in (("bpe", bpe), ("spm", spm)) for case in CASES}
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(GOLDEN.read_text())
    assert set(recorded) == set(got)
    for key, losses in got.items():
        for term, value in losses.items():
            assert abs(value - recorded[key][term]) <= 1e-5 * max(1.0, abs(value)), (key, term)
