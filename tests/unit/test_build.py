import json
import os
import signal
import subprocess
import sys

import pytest

from common.hashing import sha256_file
from data_prep import ShardError, load_shards
from data_prep.__main__ import main
from data_prep.batch import record_tokens
from data_prep.build import BuildOptions, run_build

pytestmark = pytest.mark.unit


def _opts(synth_dir, tok, out, **kw):
    sources = [f"gsm8k-aug:{synth_dir / s}.txt" for s in ("train", "valid", "test")]
    return BuildOptions(sources, str(tok), str(out), **kw)


@pytest.fixture(scope="module")
def built(synth_dir, spm_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "shards"
    run_build(_opts(synth_dir, spm_tokenizer_dir, out, shards=3), log=lambda *_: None)
    return out


def test_manifest_contract(built, spm_tokenizer_dir):
    m = json.loads((built / "manifest.json").read_text())
    assert m["counts"] == {"read": 3100, "accepted": 3100, "rejected": 0, "flagged": 0}
    assert all(isinstance(v, int) for v in m["counts"].values())
    assert set(m["special_tokens"]) == {"bos", "eos", "pad", "start_latent", "latent", "end_latent", "bot", "eot"}
    assert [s["rows"] for s in m["splits"]["train"]["shards"]] == [1000, 1000, 1000]
    assert m["templates"] == {"question_suffix": "\n", "step_separator": "\n", "answer_prefix": "### ",
                              "normalise_question": False}
    assert sum(m["splits"]["train"]["step_counts"].values()) == 3000
    assert (built / "rejects.jsonl").read_text() == ""


def test_records_hold_ids_made_with_the_saved_tokenizer(built):
    shards = load_shards(str(built))
    row = shards.split("test")[0]
    tok = shards.tokenizer
    assert row["question_ids"] == tok(row["question"] + "\n")["input_ids"]
    assert row["step_ids"] == [tok(s + "\n", add_special_tokens=False)["input_ids"] for s in row["steps"]]
    assert row["answer_ids"] == tok("### " + row["answer"], add_special_tokens=False)["input_ids"]
    assert row["teacher_cot_ids"] == tok("\n".join(row["steps"][:-1]), add_special_tokens=False)["input_ids"]
    assert row["cot_ids"] == tok("\n".join(row["steps"]), add_special_tokens=False)["input_ids"]
    assert row["source"].endswith("test.txt:1") and row["id"] == "test-000000"


def test_same_inputs_give_the_same_bytes(built, synth_dir, spm_tokenizer_dir, tmp_path):
    run_build(_opts(synth_dir, spm_tokenizer_dir, tmp_path / "again", shards=3), log=lambda *_: None)
    for rel in ("manifest.json", "train/data-00001-of-00003.arrow", "test/data-00002-of-00003.arrow"):
        assert sha256_file(tmp_path / "again" / rel) == sha256_file(built / rel)


def test_existing_output_is_kept_unless_overwrite(built, synth_dir, spm_tokenizer_dir):
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_build(_opts(synth_dir, spm_tokenizer_dir, built), log=lambda *_: None)


def test_a_killed_build_leaves_no_output_and_the_old_one_intact(synth_dir, spm_tokenizer_dir, tmp_path):
    """SIGKILL mid-build: --out is either absent or the previous complete build, never partial."""
    out = tmp_path / "shards"
    args = [sys.executable, "-m", "data_prep", "build", "--tokenizer", str(spm_tokenizer_dir), "--out", str(out),
            "--source", f"gsm8k-aug:{synth_dir / 'train.txt'}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    for line in proc.stdout:                     # killed after tokenizing, while writing
        if "accepted" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert not out.exists()
    assert main(["build", "--tokenizer", str(spm_tokenizer_dir), "--out", str(out),
                 "--source", f"gsm8k-aug:{synth_dir / 'test.txt'}"]) == 0
    before = sha256_file(out / "manifest.json")
    proc = subprocess.Popen(args + ["--overwrite"], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "accepted" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert sha256_file(out / "manifest.json") == before
    assert main(["verify", str(out)]) == 0


def _lengths(split) -> list[int]:
    return [record_tokens(q, st, a) for q, st, a in zip(split["question_ids"], split["step_ids"], split["answer_ids"])]


def test_max_length_cuts_train_and_valid_but_never_the_test_split(synth_dir, spm_tokenizer_dir, tmp_path):
    run_build(_opts(synth_dir, spm_tokenizer_dir, tmp_path / "full"), log=lambda *_: None)
    full = load_shards(str(tmp_path / "full"))
    cut = sorted(_lengths(full.split("train")))[1500]          # the median: about half the train split goes
    lines = []
    run_build(_opts(synth_dir, spm_tokenizer_dir, tmp_path / "cut", max_length=cut), log=lines.append)
    data = load_shards(str(tmp_path / "cut"))
    assert max(_lengths(data.split("train"))) <= cut and max(_lengths(data.split("valid"))) <= cut
    assert len(data.split("test")) == len(full.split("test")) == 50
    assert max(_lengths(data.split("test"))) > cut                  # the long test problems are kept
    dropped = 3000 - len(data.split("train"))
    assert dropped > 0 and any(line.endswith(f"-> train: 3000 read, {3000 - dropped} accepted, {dropped} rejected")
                               for line in lines)                     # counted after the length check


def test_verify_and_load_detect_a_corrupted_shard(built, tmp_path, capsys):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(built), str(copy)], check=True)
    assert main(["verify", str(copy)]) == 0
    shard = copy / "train" / "data-00001-of-00003.arrow"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    assert "data-00001-of-00003.arrow: sha256 differs" in capsys.readouterr().err
    with pytest.raises(ShardError, match="sha256 differs"):
        load_shards(str(copy))


def test_a_changed_tokenizer_is_an_error_never_a_silent_reuse(built, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(built), str(copy)], check=True)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(copy / "tokenizer")
    tok.add_tokens(["<new>"])
    tok.save_pretrained(copy / "tokenizer")
    with pytest.raises(ShardError, match="fingerprint"):
        load_shards(str(copy))
    with pytest.raises(ShardError, match="not the expected"):
        load_shards(str(built), expected_fingerprint="0" * 64)


def test_inspect_prints_counts_histograms_and_examples(built, capsys):
    assert main(["inspect", str(built), "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "3100 read, 3100 accepted, 0 rejected, 0 flagged" in out
    assert "[train] 3000 records in 3 shard(s)" in out and "steps per record" in out
    assert "test-000000" in out and "###" in out


def test_every_subcommand_has_help():
    for command in ("synth", "tokenizer", "build", "inspect", "verify"):
        result = subprocess.run([sys.executable, "-m", "data_prep", command, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout


def _tiny_source(tmp_path, name: str, lines: list[str]) -> str:
    path = tmp_path / f"{name}.txt"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


NEGATIVE = ["Tom has 2 apples  and gives away 5.||<<2-5=-3>> #### -3", "Ann has 2 and gets 5.||<<2+5=7>> #### 7"]


def test_digit_answers_only_rejects_train_answers_that_start_otherwise_and_counts_them(spm_tokenizer_dir, tmp_path):
    train = _tiny_source(tmp_path, "train", NEGATIVE)
    test = _tiny_source(tmp_path, "test", NEGATIVE)
    manifest = run_build(BuildOptions([f"gsm8k-aug:{train}", f"gsm8k-aug:{test}"], str(spm_tokenizer_dir),
                                      str(tmp_path / "codi"), digit_answers_only=True), log=lambda *_: None)
    data = load_shards(str(tmp_path / "codi"))
    assert [r["answer"] for r in data.split("train")] == ["7"]
    assert [r["answer"] for r in data.split("test")] == ["-3", "7"]          # evaluation sets stay whole
    assert manifest["rejected_by_reason"] == {"answer not starting with a digit": 1}
    assert manifest["digit_answers_only"] is True
    rejects = [json.loads(line) for line in (tmp_path / "codi" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"source": f"gsm8k-aug:{train}", "line": 1, "reason": rejects[0]["reason"]}]


def test_normalise_question_strips_and_collapses_double_spaces_on_every_split(spm_tokenizer_dir, tmp_path):
    from data_prep.templates import Templates
    from data_prep.tokenizer import load_pretrained

    source = _tiny_source(tmp_path, "test", [" " + NEGATIVE[0]])
    manifest = run_build(BuildOptions([f"gsm8k-aug:{source}"], str(spm_tokenizer_dir), str(tmp_path / "norm"),
                                      templates=Templates(normalise_question=True)), log=lambda *_: None)
    record = load_shards(str(tmp_path / "norm")).split("test")[0]
    assert record["question"] == "Tom has 2 apples and gives away 5."
    tok = load_pretrained(str(tmp_path / "norm" / "tokenizer"))
    assert record["question_ids"] == tok(record["question"] + "\n")["input_ids"]
    assert manifest["templates"]["normalise_question"] is True


def test_records_are_read_by_index_from_the_memory_mapped_shards(built):
    """What the trainer and evaluation read (``ShardSet.records``): the records ``to_list`` gives,
    from a split of 3 shards, by index, slice and ``take``, without the split as Python objects."""
    shards = load_shards(str(built))
    split, records = shards.split("train"), shards.records("train")
    every = split.to_list()
    assert len(records) == len(every) and len(shards.manifest["splits"]["train"]["shards"]) == 3
    picks = [len(every) - 1, 0, 137, 137, len(every) // 3]         # across the shards' bounds, repeated
    assert records.take(picks) == [every[i] for i in picks]
    assert [records[i] for i in picks] == [every[i] for i in picks] and records[-1] == every[-1]
    assert records[10:20] == every[10:20] and records[:] == every
    with pytest.raises(IndexError):
        records[len(every)]


def test_the_sampler_reads_micro_batches_ahead_and_gives_each_its_own_records(built):
    """The trainer's micro-batches read ``READ_AHEAD`` at a time from the shards: each micro-batch
    gets its own records in its order, across the read-ahead's windows, from the shards as from a
    list."""
    from pipeline.engine.sampler import READ_AHEAD, _read

    shards = load_shards(str(built))
    every = shards.split("train").to_list()
    batches = [[(7 * b + k) % len(every) for k in range(1 + b % 5)] for b in range(READ_AHEAD + 7)]
    expected = [(batch, [every[i] for i in batch]) for batch in batches]
    assert list(_read(shards.records("train"), batches)) == expected
    assert list(_read(every, batches)) == expected


def test_the_build_streams_its_batches_and_writes_what_one_batch_would(synth_dir, spm_tokenizer_dir, tmp_path):
    """Batches of 7 records (memory holds a few), tokenised here and by 2 worker processes, against
    one batch holding every record (what the build did when it kept a data set in memory): the
    same records, ids, rejects in the same
    order (a bad line, rows too long in train and valid, a train answer not starting with a
    digit), the same manifest but for the shards' bytes; and the records read back by index from
    shards of many Arrow batches."""
    bad = tmp_path / "bad.txt"
    lines = (synth_dir / "train.txt").read_text().splitlines()[:200]
    bad.write_text("\n".join(lines[:50] + ["no answer marker here"] + lines[50:] + ["q||<<1+1=2>> #### -3"]) + "\n")
    sources = [f"gsm8k-aug:{bad}@train", f"gsm8k-aug:{synth_dir / 'valid.txt'}", f"gsm8k-aug:{synth_dir / 'test.txt'}"]
    cut = sorted(_lengths(load_shards(str(_built_once(synth_dir, spm_tokenizer_dir, tmp_path))).split("train")))[1500]
    got = {}
    for batch, workers in ((7, 1), (7, 2), (10**6, 1)):
        out = tmp_path / f"batch{batch}-{workers}"
        run_build(BuildOptions(sources, str(spm_tokenizer_dir), str(out), shards=3, max_length=cut, batch_size=batch,
                               digit_answers_only=True, workers=workers), log=lambda *_: None)
        got[batch, workers] = (load_shards(str(out)), (out / "rejects.jsonl").read_text())
    (streamed, streamed_rejects), (whole, whole_rejects) = got[7, 1], got[10**6, 1]
    pooled, pooled_rejects = got[7, 2]
    assert pooled.manifest == streamed.manifest and pooled_rejects == streamed_rejects     # the same bytes too
    assert pooled.records("train")[:] == streamed.records("train")[:]
    assert streamed_rejects == whole_rejects and "no answer marker" not in streamed_rejects
    reasons = [json.loads(line)["reason"] for line in streamed_rejects.splitlines()]
    assert reasons[0] == "no '||' between question and steps"          # the reader's reject first
    assert any(r.startswith("too long") for r in reasons) and any(r.startswith("answer not starting") for r in reasons)
    for split in ("train", "valid", "test"):
        assert streamed.records(split)[:] == whole.split(split).to_list(), split
    shards_of = lambda m: {s: {k: v for k, v in info.items() if k != "shards"} for s, info in m["splits"].items()}  # noqa: E731
    assert shards_of(streamed.manifest) == shards_of(whole.manifest)
    assert {k: v for k, v in streamed.manifest.items() if k != "splits"} == \
        {k: v for k, v in whole.manifest.items() if k != "splits"}
    records = streamed.records("train")
    assert len(records) > 20 and records.take([len(records) - 1, 3, 20]) == [records[-1], records[3], records[20]]


def _built_once(synth_dir, tok, tmp_path):
    out = tmp_path / "plain"
    run_build(_opts(synth_dir, tok, out), log=lambda *_: None)
    return out
