"""Checkpoint bookkeeping: only complete tags count, corruption is caught before loading."""
import pytest

from pipeline.engine import checkpoint

pytestmark = pytest.mark.unit


def _tag(root, tag, step, complete=True):
    (root / tag).mkdir(parents=True)
    (root / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"model" * 100)
    (root / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim" * 100)
    if complete:
        checkpoint.mark_complete(str(root), tag, {"global_step": step})


def test_latest_names_the_newest_complete_tag_and_ignores_partial_saves(tmp_path):
    _tag(tmp_path, "step2", 2)
    _tag(tmp_path, "step4", 4)
    _tag(tmp_path, "step6", 6, complete=False)          # a save that died before every rank finished
    assert checkpoint.latest_tag(str(tmp_path)) == "step4"
    (tmp_path / "latest").write_text("step6")           # even if 'latest' were pointed at it
    assert checkpoint.latest_tag(str(tmp_path)) == "step4"
    assert checkpoint.complete_tags(str(tmp_path)) == ["step2", "step4"]


def test_a_corrupted_checkpoint_file_is_a_clear_error_before_loading(tmp_path):
    _tag(tmp_path, "step2", 2)
    shard = tmp_path / "step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"optim" * 99 + b"OPTIM")
    problems = checkpoint.verify(str(tmp_path), "step2")
    assert problems == [f"{shard}: differs from COMPLETE.json (corrupted or changed)"]
    with pytest.raises(checkpoint.CheckpointError, match="optim_states.pt: differs"):
        checkpoint.load(None, str(tmp_path), "step2")       # never reaches the engine
    shard.unlink()
    assert checkpoint.verify(str(tmp_path), "step2") == [f"{shard}: missing"]


def test_rotation_keeps_the_last_n_and_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        _tag(tmp_path, f"step{step}", step)
    removed = checkpoint.rotate(str(tmp_path), keep_last=2, keep={"step1"})
    assert removed == ["step2"] and checkpoint.complete_tags(str(tmp_path)) == ["step1", "step3", "step4"]


def test_init_from_takes_a_run_s_latest_or_one_named_tag(tmp_path):
    _tag(tmp_path, "epoch0", 200)
    _tag(tmp_path, "epoch1", 400)
    assert checkpoint.init_source(str(tmp_path)) == (str(tmp_path), "epoch1")
    assert checkpoint.init_source(str(tmp_path / "epoch0") + "/") == (str(tmp_path), "epoch0")
    _tag(tmp_path, "epoch2", 600, complete=False)
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint there"):
        checkpoint.init_source(str(tmp_path / "epoch2"))     # an unfinished tag is not a source
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint there"):
        checkpoint.init_source(str(tmp_path / "nowhere"))


def test_a_step_decoder_starts_from_the_pretrained_weights_unless_told_or_continued():
    import torch

    base, decoder = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    # from a CoT/Coconut checkpoint: the reference keeps the raw pretrained decoder
    assert checkpoint.decoder_weights({"base.": base, "step_decoder.": {}}, "pretrained")[0] is None
    assert checkpoint.decoder_weights({"base.": base, "step_decoder.": {}}, "base")[0] is base
    # continuing a SIM-CoT run: its own trained decoder, whatever the setting
    for init in ("pretrained", "base"):
        assert checkpoint.decoder_weights({"base.": base, "step_decoder.": decoder}, init)[0] is decoder
