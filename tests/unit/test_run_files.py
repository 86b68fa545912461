"""Run files outlive the code (pipeline/run_files.py): every file carries its schema version, an
older one is upgraded step by step to what today's code writes, a newer one is refused with both
versions, and a run keeps the tokenizer and manifest it needs (its data card)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from pipeline.engine import checkpoint
from pipeline.engine.config import load_config, save_config
from pipeline.inference.merged import latent_config_of, method_config, read_latent_config
from pipeline.latent.methods import MethodConfig
from pipeline.run_files import (
    COMPLETE,
    LATENT_CONFIG,
    VERSIONS,
    RunFileError,
    check_data_card,
    data_card,
    save_data_card,
    upgrade,
)
from tests.toy_records import SPECIAL as SP

pytestmark = pytest.mark.unit
CODI = MethodConfig("codi", num_latent=3, simcot=True, prj_dim=24, prj_layernorm=False)
SOURCE = {"run": "runs/x", "tag": "step4", "global_step": 4}


def current(method: MethodConfig = CODI, stage: int = 0) -> dict:
    return latent_config_of(method, stage, 500, SP, {"answer_prefix": "The answer is:"}, "f" * 64, projection=True,
                            attention="sdpa", body_forward="lean", source=SOURCE)


def written_by_version_1(method: MethodConfig = CODI, stage: int = 0) -> dict:
    """latent_config.json as the code before versions wrote it once it kept ``method_config``."""
    latent = {k: v for k, v in current(method, stage).items() if k != "schema_version"}
    return {"method": method.name, "simcot": method.simcot, "n_latents": method.stage_latents(stage),
            "reference_attention": method.reference_attention,
            "projection_shape": {"inner": method.prj_dim, "layernorm": method.prj_layernorm}, **latent}


def test_the_latent_config_keeps_the_method_config_the_vocabulary_facts_and_the_stage_once():
    latent = current()
    assert latent["schema_version"] == VERSIONS[LATENT_CONFIG] == 2
    assert set(latent) == {"schema_version", "method_config", "stage", "original_vocab_size", "special_tokens",
                           "templates", "tokenizer_fingerprint", "projection", "attn_implementation",
                           "body_forward", "source"}
    assert method_config(upgrade(LATENT_CONFIG, latent, "x")) == CODI


def test_version_1_is_upgraded_dropping_what_it_repeated(tmp_path):
    (tmp_path / LATENT_CONFIG).write_text(json.dumps(written_by_version_1()))
    assert read_latent_config(str(tmp_path)) == upgrade(LATENT_CONFIG, current(), "x")
    coconut = MethodConfig("coconut", c_thought=2, max_latent_stage=3)
    assert upgrade(LATENT_CONFIG, written_by_version_1(coconut, 2), "x")["method_config"] == dataclasses.asdict(coconut)


def test_version_1_before_the_projection_options_moves_its_shape_into_the_method_config():
    old = written_by_version_1()
    for key in ("prj_dim", "prj_layernorm", "prj_dropout"):
        del old["method_config"][key]
    assert method_config(upgrade(LATENT_CONFIG, old, "x")) == CODI


def test_a_repeat_that_disagrees_is_refused_by_name():
    with pytest.raises(RunFileError, match=r"x: n_latents 5 disagrees with method_config and stage, which give 3"):
        upgrade(LATENT_CONFIG, {**written_by_version_1(), "n_latents": 5}, "x")


def test_version_0_kept_the_options_one_by_one_with_the_defaults_of_its_time():
    old = {"method": "codi", "c_thought": 1, "n_latents": 3, "simcot": True, "stage": 0, "special_tokens": SP,
           "templates": {}, "projection": "projection.safetensors"}
    cfg = method_config(upgrade(LATENT_CONFIG, old, "x"))
    assert cfg == MethodConfig("codi", c_thought=1, num_latent=3, simcot=True, jacobi_iterations=0)
    assert cfg.stage_latents(0) == 3


@pytest.mark.parametrize("kind", [LATENT_CONFIG, COMPLETE, "config.yaml"])
def test_a_file_newer_than_the_code_is_refused_with_both_versions(kind):
    newer = VERSIONS[kind] + 1
    with pytest.raises(RunFileError, match=rf"where: schema_version {newer} was written by a newer version of this "
                                           rf"code, which reads {kind} up to version {VERSIONS[kind]}"):
        upgrade(kind, {"schema_version": newer}, "where")


def test_a_saved_config_carries_its_version_and_reads_back(tmp_path):
    run = load_config("configs/tiny-cpu.yaml", ["method.name=codi", "train.lr=0.01"])
    save_config(run, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert next(iter(saved)) == "schema_version" and saved["schema_version"] == VERSIONS["config.yaml"]
    assert load_config(str(tmp_path / "config.yaml")) == run
    del saved["schema_version"]               # saved before versions: the same keys
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(saved))
    assert load_config(str(tmp_path / "old.yaml")) == run
    (tmp_path / "newer.yaml").write_text(yaml.safe_dump({**saved, "schema_version": 9}))
    with pytest.raises(RunFileError, match="newer.yaml: schema_version 9 was written by a newer version"):
        load_config(str(tmp_path / "newer.yaml"))


def test_a_checkpoint_of_a_newer_version_is_refused_and_one_before_versions_read(tmp_path):
    tag = tmp_path / "step2"
    tag.mkdir()
    (tag / "shard.pt").write_bytes(b"x")
    checkpoint.mark_complete(str(tmp_path), "step2", {"global_step": 2, "epoch": 0})
    marker = json.loads((tag / COMPLETE).read_text())
    assert marker["schema_version"] == 1 and checkpoint.client_state(str(tmp_path), "step2")["global_step"] == 2
    (tag / COMPLETE).write_text(json.dumps({k: v for k, v in marker.items() if k != "schema_version"}))
    assert checkpoint.latest_tag(str(tmp_path)) == "step2" and not checkpoint.verify(str(tmp_path), "step2")
    (tag / COMPLETE).write_text(json.dumps({**marker, "schema_version": 2}))
    with pytest.raises(RunFileError, match="COMPLETE.json: schema_version 2 was written by a newer version"):
        checkpoint.client_state(str(tmp_path), "step2")


def test_a_run_keeps_its_tokenizer_and_manifest_and_refuses_shards_of_another(tiny_shards, tmp_path):
    from data_prep import load_shards

    shards = load_shards(str(tiny_shards))
    save_data_card(shards, str(tmp_path))
    card = data_card(str(tmp_path), None)
    assert card.splits == [] and card.special_tokens == shards.special_tokens
    assert len(card.tokenizer) == len(shards.tokenizer) and card.original_vocab_size == shards.original_vocab_size
    assert card.manifest["templates"] == shards.manifest["templates"]
    check_data_card(shards, str(tmp_path))               # the same tokenizer: resumes
    other = dataclasses.replace(shards, manifest={**shards.manifest, "tokenizer": {
        **shards.manifest["tokenizer"], "fingerprint": "0" * 64}})
    with pytest.raises(RunFileError, match=r"tokenized with another tokenizer than the one .* was trained with"):
        check_data_card(other, str(tmp_path))
    with pytest.raises(RunFileError, match="no data_card/ .* its shards are not at 'gone'"):
        data_card(str(tmp_path / "older"), dataclasses.replace(load_config(None), data="gone"))
