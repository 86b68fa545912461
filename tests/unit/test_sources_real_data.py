"""Every record of the shared raw files is read, with the counts the data README gives."""
from collections import Counter

import pytest

from data_prep.sources import parse_source_spec, read_source

pytestmark = pytest.mark.unit


def _read(spec: str):
    items = list(read_source(parse_source_spec(spec)))
    problems = [i.problem for i in items if i.problem]
    rejects = [i for i in items if i.reject]
    return items, problems, rejects


def _flags(problems):
    return Counter(f for p in problems for f in p.flags)


@pytest.mark.parametrize("kind, rel, split, n", [
    ("gsm8k", "gsm8k/train.jsonl", "train", 7473),
    ("gsm8k", "gsm8k/test.jsonl", "test", 1319),
    ("gsm8k-aug", "gsm8k_aug/test.txt", "test", 1319),
    ("gsm8k-aug", "gsm8k_aug/valid.txt", "valid", 500),
    ("coconut", "gsm8k_aug/coconut/gsm_valid.json", "valid", 500),
    ("coconut", "gsm8k_aug/coconut/gsm_test.json", "test", 1319),
    ("coconut", "gsm8k_aug/coconut/gsm_train_first3000.json", "train", 3000),
    ("gsm-hard", "gsm_hard/gsmhardv2.jsonl", "test", 1319),
    ("svamp", "svamp/SVAMP.json", "test", 1000),
    ("multiarith", "multiarith/MultiArith.json", "test", 600),
    ("multiarith", "multiarith/chilled_split/test.json", "test", 180),
])
def test_every_record_is_read(shared_data, kind, rel, split, n):
    spec = parse_source_spec(f"{kind}:{shared_data / rel}")
    assert spec.split == split
    items, problems, rejects = _read(f"{kind}:{shared_data / rel}")
    assert len(items) == n
    assert len(problems) + len(rejects) == n
    # Coconut train subset has one fraction answer ("2/5"): the only reject in these files.
    assert len(rejects) == (1 if rel.endswith("first3000.json") else 0)


def test_gsm8k_aug_test_spot_checks(shared_data):
    _, problems, _ = _read(f"gsm8k-aug:{shared_data / 'gsm8k_aug/test.txt'}")
    first = problems[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert first.steps == ["<<16-3-4=9>>", "<<9*2=18>>"]
    assert first.answer == "18"
    flags = _flags(problems)
    assert flags["chain_misses_answer"] == 93     # kept and flagged, never dropped
    assert flags["no_steps"] == 18                 # the 18 items with an empty chain
    assert sum(len(p.steps) == 0 for p in problems) == 18


def test_coconut_empty_chain_is_no_step_and_matches_the_txt(shared_data):
    """Coconut writes an empty chain as steps == [""]; we read it as no step at all."""
    _, from_txt, _ = _read(f"gsm8k-aug:{shared_data / 'gsm8k_aug/test.txt'}")
    _, from_json, _ = _read(f"coconut:{shared_data / 'gsm8k_aug/coconut/gsm_test.json'}")
    assert [(p.steps, p.answer) for p in from_txt] == [(p.steps, p.answer) for p in from_json]
    assert "" not in {s for p in from_json for s in p.steps}


def test_gsm8k_annotations_become_steps_and_commas_leave_answers(shared_data):
    _, problems, _ = _read(f"gsm8k:{shared_data / 'gsm8k/train.jsonl'}")
    assert problems[0].steps == ["<<48/2=24>>", "<<48+24=72>>"]
    assert problems[0].answer == "72"
    assert not any("," in p.answer for p in problems)
    assert sum(len(p.steps) == 0 for p in problems) == 95


def test_gsm8k_test_answers_equal_gsm8k_aug_test(shared_data):
    _, gsm, _ = _read(f"gsm8k:{shared_data / 'gsm8k/test.jsonl'}")
    _, aug, _ = _read(f"gsm8k-aug:{shared_data / 'gsm8k_aug/test.txt'}")
    assert [p.answer for p in gsm] == [p.answer for p in aug]


def test_answer_only_sets(shared_data):
    _, hard, _ = _read(f"gsm-hard:{shared_data / 'gsm_hard/gsmhardv2.jsonl'}")
    assert hard[0].answer == "-9867630" and hard[0].steps == []
    _, svamp, _ = _read(f"svamp:{shared_data / 'svamp/SVAMP.json'}")
    assert svamp[0].question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on "
                                 "each pack How much do you have to pay to buy each pack?")
    assert svamp[0].answer == "51"
    _, multi, _ = _read(f"multiarith:{shared_data / 'multiarith/chilled_split/test.json'}")
    assert multi[0].answer == "10" and not multi[0].question.startswith(" ")
