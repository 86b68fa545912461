"""A corpus of malformed records: each is rejected with its line and reason, nothing is lost."""
import json

import pytest

from data_prep import load_shards
from data_prep.build import BuildOptions, StrictRejectError, run_build

pytestmark = pytest.mark.unit

GOOD = "Ann has 2 pens and gets 3 more. How many pens does Ann have now?||<<2+3=5>> #### 5"
AUG_LINES = [  # (text, expected reason fragment or None for accepted)
    (GOOD, None),
    ("Ann has 2 pens. <<2+3=5>> #### 5", "no '||'"),
    ("  ||<<2+3=5>> #### 5", "empty question"),
    ("Q?||<<2+3=5>> 5", "no '####'"),
    ("Q?||<<2+3=5 #### 5", "unbalanced"),
    ("Q?||<<2+3=5>> #### five", "non-numeric answer"),
    ("Q?||<<2+3=5>> #### ", "empty answer"),
    ("Q?||<<2+3=5>> #### 5 #### 6", "2 '####' answer markers"),
    ("Q?||<<2+3>> #### 5", "not of the form <<expression=result>>"),
    ("Q?||<<2+3=5>> then #### 5", "not of the form <<expression=result>>"),
    ("Q? " + "many " * 400 + "||<<2+3=5>> #### 5", "too long"),
    ("Q?||<<2*3=7>> #### 7", None),                               # wrong arithmetic: kept, flagged
]
GSM8K_LINES = [
    ('{"question": "Q?", "answer": "2+3 = <<2+3=5>>5\\n#### 5"}', None),
    ('{"question": "Q?", "answer": "#### 5"', "bad JSON"),
    ("[1, 2]", "record is list"),
    ('{"question": "Q?"}', "missing field 'answer'"),
    ('{"question": 5, "answer": "#### 5"}', "field 'question' is int"),
]


@pytest.fixture
def malformed_sources(tmp_path):
    aug = tmp_path / "bad_train.txt"
    with open(aug, "wb") as handle:
        for text, _ in AUG_LINES:
            handle.write(text.encode() + b"\n")
        handle.write(b"\n")                                    # blank line: not a record
        handle.write(b"Caf\xe9 question||<<1+1=2>> #### 2\n")   # latin-1 byte: not UTF-8
    gsm = tmp_path / "bad_test.jsonl"
    gsm.write_text("".join(line + "\n" for line, _ in GSM8K_LINES))
    coconut = tmp_path / "bad_valid.json"
    coconut.write_text(json.dumps([{"question": "Q?", "steps": ["<<1+1=2>>"], "answer": "2"},
                                   {"question": "Q?", "steps": "<<1+1=2>>", "answer": "2"}]))
    return aug, gsm, coconut


def _build(tmp_path, sources, tokenizer, **kw):
    opts = BuildOptions([f"{k}:{p}" for k, p in sources], str(tokenizer), str(tmp_path / "out"),
                        max_length=200, **kw)
    return run_build(opts, log=lambda *_: None)


def test_each_malformed_record_is_rejected_with_line_and_reason(tmp_path, malformed_sources, spm_tokenizer_dir):
    aug, gsm, coconut = malformed_sources
    manifest = _build(tmp_path, [("gsm8k-aug", aug), ("gsm8k", gsm), ("coconut", coconut)], spm_tokenizer_dir)
    rejects = [json.loads(line) for line in open(tmp_path / "out" / "rejects.jsonl")]
    expected = [(f"gsm8k-aug:{aug}", i + 1, r) for i, (_, r) in enumerate(AUG_LINES) if r]
    expected.append((f"gsm8k-aug:{aug}", len(AUG_LINES) + 2, "not UTF-8"))
    expected += [(f"gsm8k:{gsm}", i + 1, r) for i, (_, r) in enumerate(GSM8K_LINES) if r]
    expected.append((f"coconut:{coconut}", 2, "'steps' must be a list"))
    got = sorted((r["source"], r["line"], r["reason"]) for r in rejects)
    assert len(got) == len(expected) >= 12
    for source, line, fragment in expected:
        assert any(s == source and n == line and fragment in reason for s, n, reason in got), (source, line, fragment)
    counts = manifest["counts"]
    assert counts == {"read": 4 + len(expected), "accepted": 4, "rejected": len(expected), "flagged": 1}
    assert manifest["flagged_by_reason"] == {"step_result_wrong": 1}


def test_read_always_equals_accepted_plus_rejected_per_source(tmp_path, malformed_sources, spm_tokenizer_dir):
    aug, gsm, coconut = malformed_sources
    manifest = _build(tmp_path, [("gsm8k-aug", aug), ("gsm8k", gsm)], spm_tokenizer_dir)
    for source in manifest["sources"]:
        assert source["read"] == source["accepted"] + source["rejected"]
    shards = load_shards(str(tmp_path / "out"))
    assert sum(len(shards.split(s)) for s in shards.splits) == manifest["counts"]["accepted"]


def test_strict_stops_at_the_first_reject_naming_file_and_line(tmp_path, malformed_sources, spm_tokenizer_dir):
    aug, _, _ = malformed_sources
    with pytest.raises(StrictRejectError, match=rf"{aug}:2: no '\|\|'"):
        _build(tmp_path, [("gsm8k-aug", aug)], spm_tokenizer_dir, strict=True)
    assert not (tmp_path / "out").exists()


def test_strict_stops_at_the_first_reject_found_in_a_worker_process(tmp_path, spm_tokenizer_dir):
    """Batches of one record with 2 workers: the pool takes a source's batches from its third, so
    lines 4 and 5 are parsed and tokenised there; the first reject in input order is the one
    raised here, as in one process."""
    aug = tmp_path / "late_train.txt"
    aug.write_text("\n".join([GOOD] * 3 + ["Q? " + "many " * 400 + "||<<2+3=5>> #### 5", "no separator"]) + "\n")
    with pytest.raises(StrictRejectError, match=rf"{aug}:4: too long") as raised:
        _build(tmp_path, [("gsm8k-aug", aug)], spm_tokenizer_dir, strict=True, batch_size=1, workers=2)
    assert type(raised.value.__cause__).__name__ == "_RemoteTraceback"          # raised in a worker
    assert not (tmp_path / "out").exists()


def test_a_whole_json_file_that_does_not_parse_is_one_reject(tmp_path, spm_tokenizer_dir):
    broken = tmp_path / "broken_test.json"
    broken.write_text('[{"question": "Q?", "steps": [], "answer": "1"},\n  {oops}]')
    manifest = _build(tmp_path, [("coconut", broken)], spm_tokenizer_dir)
    reject = json.loads(open(tmp_path / "out" / "rejects.jsonl").readline())
    assert reject["line"] == 2 and reject["reason"].startswith("bad JSON")
    assert manifest["counts"]["rejected"] == 1


def test_unknown_kind_and_unknown_split_are_clear_errors(tmp_path):
    from data_prep.sources import parse_source_spec
    with pytest.raises(ValueError, match="KIND one of"):
        parse_source_spec("csv:x.csv")
    with pytest.raises(ValueError, match="append @train"):
        parse_source_spec(f"gsm8k-aug:{tmp_path}/problems.txt")
    assert parse_source_spec("gsm8k-aug:problems.txt@valid").split == "valid"


def test_gsm8k_aug_nl_steps_are_sentences_and_malformed_rows_are_rejected(tmp_path):
    from data_prep.sources import SourceSpec, read_source

    rows = [{"question": "Ann has 2 pens and gets 3. How many?", "cot": "Ann has 2 pens. She gets 3 more. 2 + 3 = 5.",
             "answer": "5"},
            {"question": "Q?", "cot": "Two and three make five.", "answer": 5},
            {"question": "Q?", "cot": "Some words."},
            {"question": "Q?", "cot": "Some words.", "answer": "five"}]
    path = tmp_path / "nl_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parsed = list(read_source(SourceSpec("gsm8k-aug-nl", str(path), "train")))
    assert parsed[0].problem.steps == ["Ann has 2 pens.", "She gets 3 more.", "2 + 3 = 5."]
    assert parsed[0].problem.answer == "5" and parsed[1].problem.steps == ["Two and three make five."]
    assert parsed[1].problem.answer == "5" and not parsed[0].problem.flags        # no arithmetic to check
    assert [p.reject for p in parsed[2:]] == ["missing field 'answer'", "non-numeric answer 'five'"]
