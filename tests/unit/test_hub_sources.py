"""``data_prep build --source hub:...`` on local copies of the evaluation sets' hub repositories,
laid out and named as the references load them (GSM8K ``main`` test, ``juyoung-trl/gsm-hard``,
``ChilleD/SVAMP`` train + test, ``ChilleD/MultiArith`` test, GSM8k-Aug's validation split)."""
from __future__ import annotations

import json

import pytest

from data_prep import load_shards
from data_prep.build import BuildOptions, run_build
from data_prep.sources import parse_source_spec

LAYOUTS = {   # repository -> {file: rows}, with each dataset's own columns
    "gsm8k": {"test.jsonl": [{"question": "Ann has 5 pens and gets 2. How many?",
                              "answer": "She has 5 + 2 = <<5+2=7>>7 pens.\n#### 7"}]},
    "gsm-hard": {"train.jsonl": [{"instruction": "Bo has 1,200,000 cards and loses 3. How many?",
                                  "response": 1199997.0, "code": "def solution(): ..."},
                                 {"instruction": "Cy has 2.5 kg twice. How much?", "response": 5.0, "code": ""}]},
    "svamp": {"train.jsonl": [{"ID": "a1", "Body": "Tom had 8 apples.", "Question": "How many now?",
                               "Equation": "( 8.0 - 3.0 )", "Answer": 5.0, "Type": "Subtraction",
                               "question_concat": "Tom had 8 apples. He ate 3. How many now?"}],
              "test.jsonl": [{"ID": "b1", "Body": "Sue has 4 bags.", "Question": "How many?",
                              "Equation": "( 4.0 * 2.0 )", "Answer": 8.0, "Type": "Multiplication",
                              "question_concat": "Sue has 4 bags of 2. How many?"}]},
    "multiarith": {"test.jsonl": [{"question": " Ed had 3 toys and got 4 more. How many? ", "final_ans": "7"}],
                   "train.jsonl": [{"question": "Not this one.", "final_ans": "1"}]},
    "gsm8k-aug": {"validation.jsonl": [{"question": "Kai has 9 coins and finds 4. How many?",
                                        "cot": "<<9+4=13>>", "answer": "13"}]},
}
SOURCES = {"gsm8k": ":test", "gsm-hard": ":train@test", "svamp": ":train+test@test", "multiarith": ":test",
           "gsm8k-aug": ":validation"}


def write_copy(root, name: str) -> str:
    folder = root / name
    folder.mkdir()
    for file, rows in LAYOUTS[name].items():
        (folder / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_each_evaluation_set_builds_from_its_hub_layout(name, tmp_path, spm_tokenizer_dir):
    spec = f"hub:{write_copy(tmp_path, name)}{SOURCES[name]}"
    out = tmp_path / "shards"
    run_build(BuildOptions([spec], str(spm_tokenizer_dir), str(out)), log=lambda *_: None)
    shards = load_shards(str(out))
    split = "valid" if name == "gsm8k-aug" else "test"
    records = shards.split(split).to_list()
    expected = {"gsm8k": ["7"], "gsm-hard": ["1199997", "5"], "svamp": ["5", "8"], "multiarith": ["7"],
                "gsm8k-aug": ["13"]}[name]
    assert [r["answer"] for r in records] == expected
    if name == "svamp":                     # the reference's question_concat, train then test
        assert shards.tokenizer.decode(records[0]["question_ids"], skip_special_tokens=True).startswith(
            "Tom had 8 apples. He ate 3.")
    assert shards.manifest["counts"]["rejected"] == 0


def test_a_hub_split_that_is_not_ours_must_be_named():
    with pytest.raises(ValueError, match="@train, @valid or @test"):
        parse_source_spec("hub:ChilleD/SVAMP:train+test")
    spec = parse_source_spec("hub:ChilleD/SVAMP:train+test@test")
    assert (spec.path, spec.hub_split, spec.split) == ("ChilleD/SVAMP", "train+test", "test")
    assert parse_source_spec("hub:whynlp/gsm8k-aug:valid").hub_split == "validation"
