import re
from collections import Counter

import pytest

from data_prep.__main__ import main
from data_prep.arithmetic import check_steps
from data_prep.sources import parse_gsm8k_aug
from data_prep.synth import SynthConfig, generate_splits

pytestmark = pytest.mark.unit
SIZES = {"train": 3000, "valid": 100, "test": 200}


def test_same_seed_same_problems_other_seed_other_problems():
    a = generate_splits(SIZES, 1, SynthConfig())
    assert a == generate_splits(SIZES, 1, SynthConfig())
    assert a["test"] != generate_splits(SIZES, 2, SynthConfig())["test"]


def test_splits_never_share_a_question():
    splits = generate_splits(SIZES, 0, SynthConfig())
    questions = {s: [line.split("||")[0] for line in lines] for s, lines in splits.items()}
    for split, qs in questions.items():
        assert len(qs) == len(set(qs)) == SIZES[split]
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["train"]) & set(questions["valid"])
    assert not set(questions["valid"]) & set(questions["test"])


def test_test_split_does_not_depend_on_train_size():
    small = generate_splits({"train": 10, "valid": 10, "test": 50}, 3, SynthConfig())
    large = generate_splits({"train": 2000, "valid": 10, "test": 50}, 3, SynthConfig())
    assert small["test"] == large["test"]


@pytest.mark.parametrize("cfg", [SynthConfig(), SynthConfig(1, 8, 20, 9, 200)])
def test_every_chain_is_exact_and_reaches_the_answer(cfg):
    for line in generate_splits({"train": 500, "valid": 0, "test": 0}, 5, cfg)["train"]:
        problem = parse_gsm8k_aug(line)
        assert check_steps(problem.steps, problem.answer) == []
        assert cfg.min_steps <= len(problem.steps) <= cfg.max_steps
        values = [int(v) for step in problem.steps for v in re.findall(r"\d+", step)]
        assert all(0 < v <= max(cfg.max_result, cfg.max_factor * cfg.max_operand) for v in values)
        assert 2 <= int(problem.answer) <= cfg.max_result


def test_text_has_natural_language_variety():
    lines = generate_splits({"train": 2000, "valid": 0, "test": 0}, 0, SynthConfig())["train"]
    first_sentences = Counter(re.sub(r"\d+|^\w+|\b(he|she)\b", "#", text.split(". ")[0]) for text in lines)
    assert len(first_sentences) >= 20
    answers = Counter(text.rsplit("#### ", 1)[1] for text in lines)
    assert answers.most_common(1)[0][1] / len(lines) < 0.1           # no answer dominates


def test_cli_writes_three_files(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--train", "20", "--valid", "5", "--test", "5",
                 "--min-steps", "1", "--max-steps", "6"]) == 0
    assert [len((tmp_path / f"{s}.txt").read_text().splitlines()) for s in ("train", "valid", "test")] == [20, 5, 5]


def test_impossible_request_is_a_clear_error(capsys):
    assert main(["synth", "--out", "/tmp/unused", "--train", "100000", "--min-steps", "1", "--max-steps", "1",
                 "--max-operand", "3", "--max-factor", "2", "--max-result", "4"]) == 2
    assert "distinct" in capsys.readouterr().err
