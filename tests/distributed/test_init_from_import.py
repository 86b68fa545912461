"""A CODI + SIM-CoT release imported by ``pipeline.import_reference`` continues training under
ZeRO-3 on 2 ranks: ``checkpoint.init_from`` takes the imported directory (base, step decoder and
projection), and with lr 0 the checkpoint holds exactly the imported weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline import import_reference
from tests.distributed.conftest import losses_by_step, torchrun
from tests.fidelity import reference_releases as rr

pytestmark = pytest.mark.distributed


def test_an_imported_codi_release_continues_training(synth_dir, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from data_prep.__main__ import main as data_prep
    from tests.local_tokenizers import llama3_style_bpe

    texts = (synth_dir / "train.txt").read_text().splitlines()[:300]
    base = rr.save_base(str(tmp_path / "base"), llama3_style_bpe(texts, vocab_size=400))
    release = rr.save_codi(rr.ReferenceCODI(base), str(tmp_path / "release"))
    out = str(tmp_path / "imported")
    assert import_reference.main(["--from", release, "--format", "codi", "--base", base, "--out", out]) == 0
    train = tmp_path / "train.txt"
    train.write_text("\n".join(texts[:64]) + "\n")
    assert data_prep(["build", "--tokenizer", out, "--out", str(tmp_path / "shards"), "--question-suffix", "",
                      "--step-separator", " ", "--answer-prefix", "The answer is: ", "--normalise-question",
                      "--source", f"gsm8k-aug:{train}"]) == 0
    code, log = torchrun(["--config", "configs/tiny-cpu.yaml", f"data={tmp_path / 'shards'}",
                          f"runs_dir={tmp_path}", "name=continued", f"model.name_or_path={base}",
                          "model.lora.enabled=true", "model.lora.r=4", "method.name=codi", "method.simcot=true",
                          "method.reference_quirks=true", "train.micro_batch_size=8", "train.max_steps=2",
                          "train.lr=0", "train.validate=false", f"checkpoint.init_from={out}"])
    assert code == 0 and f"initialised weights from {out}; step decoder from the checkpoint's step decoder" in log, \
        log[-3000:]
    losses = losses_by_step(tmp_path / "continued")
    assert sorted(losses) == [1, 2] and all(0 < v < 50 for v in losses.values())
    state = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "continued" / "checkpoints"))
    projection, decoder = load_file(f"{out}/projection.safetensors"), load_file(f"{out}/step_decoder/model.safetensors")
    assert all(torch.equal(state[f"projection.{k}"], v) for k, v in projection.items())
    assert all(torch.equal(state[f"step_decoder.{k}"], v) for k, v in decoder.items())
    imported = load_file(f"{out}/model.safetensors")
    layer = "model.layers.0.self_attn.q_proj"
    assert torch.equal(state[f"base.base_model.model.{layer}.base_layer.weight"], imported[f"{layer}.weight"])
