"""Shared fixtures. ``../shared`` (data, fixtures) sits beside the repository; a user's clone has
none, so tests that need it skip there, while CI sets REQUIRE_SHARED=1 and a missing folder fails."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIMCOT_SHARED", REPO.parent / "shared"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("REQUIRE_SHARED") == "1":
            pytest.fail(f"{path} is missing and REQUIRE_SHARED=1: CI needs ../shared beside the repository")
        pytest.skip(f"{path} not found: ../shared (read-only team data) is not beside this clone")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _shared_path("data")


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    return _shared_path("fixtures")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic data set (train/valid/test.txt), generated once per session."""
    from data_prep.synth import SynthConfig, generate_splits, write_splits

    out = tmp_path_factory.mktemp("synth")
    write_splits(str(out), generate_splits({"train": 3000, "valid": 50, "test": 50}, 0, SynthConfig()))
    return out


@pytest.fixture(scope="session")
def spm_tokenizer_dir(synth_dir, tmp_path_factory) -> Path:
    """The embedded default's tokenizer: SentencePiece trained here, saved as a HF tokenizer."""
    from data_prep.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer([str(synth_dir / "train.txt")], 512, None, str(out))
    return out


@pytest.fixture(scope="session")
def tiny_shards(synth_dir, spm_tokenizer_dir, tmp_path_factory) -> Path:
    """400 train / 50 valid synthetic problems, tokenized with the SentencePiece tokenizer."""
    from data_prep.build import BuildOptions, run_build

    train = tmp_path_factory.mktemp("tiny") / "train.txt"
    train.write_text("".join((synth_dir / "train.txt").read_text().splitlines(keepends=True)[:400]))
    out = tmp_path_factory.mktemp("tiny_shards") / "shards"
    run_build(BuildOptions([f"gsm8k-aug:{train}", f"gsm8k-aug:{synth_dir / 'valid.txt'}"],
                           str(spm_tokenizer_dir), str(out)), log=lambda *_: None)
    return out
