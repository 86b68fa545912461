"""2-rank ZeRO-3 checkpoint -> merged HF model (same logits as the engine) -> evaluation report."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import REPO

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    logits = runs / "engine_logits.pt"
    overrides = [f"data={tiny_shards}", f"runs_dir={runs}", "name=codi", "model.tiny.hidden_size=64",
                 "model.tiny.intermediate_size=128", "method.name=codi", "method.simcot=true", "method.num_latent=2",
                 "train.max_steps=4", "train.micro_batch_size=8", "train.validate=false",
                 # a narrower step decoder (model.decoder_path; smollm2's test covers the base's copy)
                 "model.decoder_path=tiny", "model.decoder_tiny.hidden_size=32", "model.decoder_tiny.num_layers=1",
                 "model.decoder_tiny.intermediate_size=64"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tests.distributed.engine_logits", str(logits), "--config", "configs/tiny-cpu.yaml", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs / "codi", torch.load(logits, weights_only=True)


def _run(*args):
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_merged_model_gives_the_engines_logits(trained):
    run, engine = trained
    assert "logits of the reloaded model checked" in _run("pipeline.merge", "--run", str(run))
    merged = run / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=engine["ids"]).logits
    assert (logits - engine["logits"]).abs().max().item() <= 1e-5
    latent = json.loads((merged / "latent_config.json").read_text())
    assert latent["schema_version"] == 2 and latent["method_config"]["name"] == "codi" and latent["projection"]
    assert latent["method_config"]["num_latent"] == 2 and "n_latents" not in latent     # derived: not kept twice
    assert (merged / "step_decoder" / "model.safetensors").exists() and (merged / "projection.safetensors").exists()
    decoder_config = json.loads((merged / "step_decoder" / "config.json").read_text())
    assert decoder_config["hidden_size"] == 32
    # the reference's decoder vocabulary: the tokenizer's before data_prep added its 5 tokens
    assert decoder_config["vocab_size"] == latent["original_vocab_size"] == model.config.vocab_size - 5
    assert (merged / "step_decoder" / "decoder_in.safetensors").exists()
    assert (merged / "tokenizer.json").exists()


def test_evaluation_writes_readable_reports_and_plots(trained, tiny_shards, tmp_path):
    run, _ = trained
    if not (run / "merged").exists():
        _run("pipeline.merge", "--run", str(run))
    out = tmp_path / "eval"
    stdout = _run("pipeline.evaluate", "--model", str(run / "merged"), "--set", f"synth={tiny_shards}",
                  "--split", "valid", "--limit", "12", "--batch-size", "5", "--max-new-tokens", "8",
                  "--decode-latents", "2", "--out", str(out))
    assert "synth: accuracy" in stdout
    report = json.loads((out / "report.json").read_text())
    synth = report["sets"]["synth"]
    assert synth["n"] == 12 and 0 <= synth["accuracy_hash"] <= 1 and synth["problems_per_s"] > 0
    assert synth["mean_tokens"] >= 2                               # latents count as generated tokens
    assert len(report["latents"]) == 2 and len(report["latents"][0]["decoded_steps"]) == 2   # one per fed latent
    assert len(report["latents"][0]["logit_lens_top5"][0]) == 5
    assert "| synth | 12 |" in (out / "report.md").read_text()
    geometry = synth["latent_geometry"]           # what training watches, per checkpoint
    assert -1 <= geometry["latent_cosine"] <= 1 and geometry["latent_norm_ratio"] > 0
    assert all(-1 <= row["latent_cosine"] <= 1 for row in synth["examples"])
    tag, step = report["latent_config"]["source"]["tag"], report["latent_config"]["source"]["global_step"]
    assert f"## Latent geometry of checkpoint `{tag}` (step {step})" in (out / "report.md").read_text()
    import matplotlib.image
    for png in ("accuracy.png", "latent_similarity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(out / png).ndim == 3


def test_evaluation_split_across_two_ranks_counts_every_problem_once(trained, tiny_shards, tmp_path):
    run, _ = trained
    if not (run / "merged").exists():
        _run("pipeline.merge", "--run", str(run))
    out = tmp_path / "eval2"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "pipeline.evaluate", "--model", str(run / "merged"), "--set", f"synth={tiny_shards}",
                             "--split", "valid", "--limit", "11", "--batch-size", "4", "--max-new-tokens", "6",
                             "--decode-latents", "0", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    ids = [e["id"] for e in report["sets"]["synth"]["examples"]]
    assert report["sets"]["synth"]["n"] == 11 and len(set(ids)) == len(ids)


def test_evaluation_refuses_a_set_built_with_another_tokenizer(trained, synth_dir, tmp_path):
    from data_prep.build import BuildOptions, run_build
    from data_prep.tokenizer import build_tokenizer

    run, _ = trained
    if not (run / "merged").exists():
        _run("pipeline.merge", "--run", str(run))
    other_tok = tmp_path / "tok400"
    build_tokenizer([str(synth_dir / "train.txt")], 400, None, str(other_tok))
    other = tmp_path / "other"
    run_build(BuildOptions([f"gsm8k-aug:{synth_dir / 'valid.txt'}"], str(other_tok), str(other)), log=lambda *_: None)
    result = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--model", str(run / "merged"),
                             "--set", f"synth={other}", "--split", "valid", "--limit", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "but the model was trained with" in result.stderr, result.stderr[-2000:]
