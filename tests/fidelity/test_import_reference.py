"""``python -m pipeline.import_reference`` on tiny releases in the references' own layouts: every
tensor accounted for, and ``pipeline.evaluate`` generating the tokens the reference's evaluation
loop generates on the same weights and left-padded batches; broken releases refused by name."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from pipeline import evaluate, import_reference
from tests.fidelity import reference_releases as rr
from tests.local_tokenizers import llama3_style_bpe

pytestmark = pytest.mark.fidelity
QUESTIONS = [                                    # lengths differ (left pads); two double spaces
    ("Ann has 5 pens and gets 2 more.  How many pens?", "7"),
    ("A farm has 12 cows and 30 hens. Each cow eats 3 bales and each hen 1 scoop. How many in all?", "66"),
    ("Kai has 9 coins.", "9"),
    ("Tom reads 4 pages a day for 6 days, then  reads 10 more. How many pages did he read?", "34"),
    ("Mia bakes 3 trays of 8 cookies. How many?", "24"),
]
CODI_BUILD = ["--question-suffix", "", "--step-separator", " ", "--answer-prefix", "The answer is: ",
              "--normalise-question"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    texts = [q for q, _ in QUESTIONS] * 20 + ["<<5+2=7>> <<7*2=14>> The answer is: 14 0 1 2 3 4 5 6 7 8 9"] * 20
    return rr.save_base(str(tmp_path_factory.mktemp("base") / "llama"), llama3_style_bpe(texts, vocab_size=400))


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gsm8k") / "test.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"So <<{a}={a}>>{a}.\n#### {a}"}) + "\n"
                            for q, a in QUESTIONS))
    return str(path)


def build_set(model_dir: str, source: str, out: str, extra: list[str]) -> str:
    from data_prep.__main__ import main as data_prep

    assert data_prep(["build", "--tokenizer", model_dir, "--out", out, "--source", source, *extra]) == 0
    return out


def predictions(eval_dir: str) -> list[dict]:
    with open(os.path.join(eval_dir, "predictions.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_a_codi_release_generates_the_reference_loops_tokens(layout, base, eval_file, tmp_path):
    ref = rr.ReferenceCODI(base)
    release = rr.save_codi(ref, str(tmp_path / "release"), layout)
    out = str(tmp_path / "imported")
    assert import_reference.main(["--from", release, "--format", "codi", "--base", base, "--out", out]) == 0
    report = json.load(open(os.path.join(out, "import_report.json")))
    assert report["tensors"] == len(ref.state_dict())
    assert report["lora_merged"]["r"] == 8 and report["lora_merged"]["modules"] == 7 * 2
    shards = build_set(out, f"gsm8k:{eval_file}", str(tmp_path / "set"), CODI_BUILD)
    assert evaluate.main(["--model", out, "--set", f"gsm8k={shards}", "--protocol", "codi", "--batch-size", "3",
                          "--device", "cpu", "--decode-latents", "1", "--out", str(tmp_path / "eval")]) == 0
    ours = [row["output_ids"] for row in predictions(str(tmp_path / "eval"))]
    theirs = rr.codi_test_loop(ref, rr.reference_tokenizer(base), [q for q, _ in QUESTIONS], batch_size=3)
    eos = ref.codi.config.eos_token_id
    assert ours == [t[:-1] if t and t[-1] == eos else t for t in theirs]
    assert any(len(t) > 3 for t in ours)          # not a trivially empty answer


def test_the_imported_layout_is_the_references(base, tmp_path):
    from transformers import AutoTokenizer

    ref = rr.ReferenceCODI(base, decoder=False)
    out = str(tmp_path / "imported")
    import_reference.main(["--from", rr.save_codi(ref, str(tmp_path / "r")), "--format", "codi", "--base", base,
                           "--out", out])
    tok, latent = AutoTokenizer.from_pretrained(out), json.load(open(os.path.join(out, "latent_config.json")))
    v = ref.vocab
    assert (latent["special_tokens"]["pad"], latent["special_tokens"]["bot"], latent["special_tokens"]["eot"]) == \
        (v, v + 1, v + 2)
    assert latent["original_vocab_size"] == v and len(tok) == v + 6
    method = latent["method_config"]
    assert method["reference_quirks"] and not method["simcot"] and method["num_latent"] == 6 and latent["stage"] == 0
    assert not os.path.isdir(os.path.join(out, "step_decoder"))


def test_wrong_shapes_a_missing_tensor_and_a_foreign_key_are_refused(base, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    release = rr.save_codi(rr.ReferenceCODI(base), str(tmp_path / "release"))
    state = load_file(os.path.join(release, "model.safetensors"))
    embed = "codi.base_model.model.model.embed_tokens.weight"
    cases = {
        "rows": ({**state, embed: state[embed][:-1]}, ["model.embed_tokens.weight", str(list(state[embed][:-1].shape)),
                                                      str(list(state[embed].shape))]),
        "missing": ({k: v for k, v in state.items() if "layers.1.post_attention_layernorm" not in k},
                    ["missing", "model.layers.1.post_attention_layernorm.weight"]),
        "foreign": ({**state, "gate.weight": torch.zeros(2)}, ["gate.weight"]),
    }
    for name, (weights, words) in cases.items():
        broken = tmp_path / name
        shutil.copytree(release, broken)
        save_file(weights, str(broken / "model.safetensors"))
        code = import_reference.main(["--from", str(broken), "--format", "codi", "--base", base,
                                      "--out", str(tmp_path / f"out-{name}")])
        err = capsys.readouterr().err
        assert code == 2 and all(w in err for w in words), (name, err)
        assert not os.path.exists(tmp_path / f"out-{name}")


def test_an_empty_config_without_base_is_refused_with_the_fix(base, tmp_path, capsys):
    release = rr.save_codi(rr.ReferenceCODI(base, decoder=False), str(tmp_path / "release"))
    assert import_reference.main(["--from", release, "--format", "codi", "--out", str(tmp_path / "o")]) == 2
    assert "config.json is empty" in capsys.readouterr().err


def gpt2_style_bpe(texts: list[str]):
    """A byte-level BPE as GPT-2's: no BOS, ``<|endoftext|>`` its EOS, no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_a_coconut_release_generates_the_reference_loops_tokens(eval_file, tmp_path):
    texts = [q for q, _ in QUESTIONS] * 20 + ["<<5+2=7>>\n<<7*2=14>>\n### 14 0 1 2 3 4 5 6 7 8 9"] * 20
    base = rr.save_gpt2_base(str(tmp_path / "gpt2"), gpt2_style_bpe(texts))
    ref = rr.ReferenceCoconut(base)
    release = rr.save_coconut(ref, str(tmp_path / "ckpts"))
    out = str(tmp_path / "imported")
    assert import_reference.main(["--from", release, "--format", "coconut", "--base", base, "--out", out,
                                  "--max-latent-stage", "3"]) == 0
    report = json.load(open(os.path.join(out, "import_report.json")))
    assert report["tensors"] == len(ref.state_dict())
    assert {d["key"] for d in report["dropped"]} == {"embedding.weight", "base lm_head.weight"}
    shards = build_set(out, f"gsm8k:{eval_file}", str(tmp_path / "set"), [])
    assert evaluate.main(["--model", out, "--set", f"gsm8k={shards}", "--protocol", "coconut", "--device", "cpu",
                          "--decode-latents", "0", "--out", str(tmp_path / "eval")]) == 0
    rows = predictions(str(tmp_path / "eval"))
    assert [r["output_ids"] for r in rows] == [rr.coconut_generate(ref, q, n_latents=6) for q, _ in QUESTIONS]
    assert all(r["tokens"] == 64 or r["output_ids"] for r in rows)


def test_a_gpt2_codi_release_merges_its_conv1d_lora(eval_file, tmp_path):
    """GPT-2's Conv1D layers store weights in x out (c_proj square): the LoRA update is transposed."""
    texts = [q for q, _ in QUESTIONS] * 20 + ["<<5+2=7>> <<7*2=14>> The answer is: 14 0 1 2 3 4 5 6 7 8 9"] * 20
    base = rr.save_gpt2_base(str(tmp_path / "gpt2"), gpt2_style_bpe(texts))
    ref = rr.ReferenceCODI(base, decoder=False, targets=rr.GPT2_TARGETS)
    out = str(tmp_path / "imported")
    release = rr.save_codi(ref, str(tmp_path / "r"), "bin")      # tied tables: torch.save, as zen-E/CODI-gpt2
    assert import_reference.main(["--from", release, "--format", "codi", "--base", base, "--out", out]) == 0
    shards = build_set(out, f"gsm8k:{eval_file}", str(tmp_path / "set"), CODI_BUILD)
    assert evaluate.main(["--model", out, "--set", f"gsm8k={shards}", "--protocol", "codi", "--batch-size", "3",
                          "--device", "cpu", "--decode-latents", "0", "--out", str(tmp_path / "eval")]) == 0
    theirs = rr.codi_test_loop(ref, rr.reference_tokenizer(base), [q for q, _ in QUESTIONS], batch_size=3)
    eos = ref.codi.config.eos_token_id
    assert [r["output_ids"] for r in predictions(str(tmp_path / "eval"))] == \
        [t[:-1] if t and t[-1] == eos else t for t in theirs]
