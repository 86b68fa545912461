"""The files a run leaves, versioned, so that a run outlives the code that wrote it.

    tree = upgrade(CONFIG, tree, path)              # pipeline/engine/config.py: load_config
    latent = upgrade(LATENT_CONFIG, latent, path)   # pipeline/inference/merged.py: read_latent_config
    complete = upgrade(COMPLETE, complete, path)    # pipeline/engine/checkpoint.py: a checkpoint's metadata
    keep_run_files(run_dir, run, ds_config, shards, rank)   # the trainer, at start-up
    shards = data_card(run_dir, run)                # pipeline/merge.py: the run's tokenizer and manifest

Each file carries ``schema_version``. A reader upgrades an older file one version at a time, each
step one function below that says what changed (and has its test in tests/unit/test_run_files.py),
and refuses a file newer than it reads, naming both versions. To change a file's format: raise its
version here and add the step from the version before.

A run also keeps what it needs of its shards, so that it merges without them (``data_card/``:
the shards' manifest without its splits, and the tokenizer; :func:`save_data_card`).

A file without ``schema_version`` was written before versions existed: a ``config.yaml`` in the
format of version 1 (the same keys; a recipe a user writes needs no version either), a
``latent_config.json`` of version 1 where it holds ``method_config``, else of version 0, a
checkpoint's ``COMPLETE.json`` of version 1.
"""
from __future__ import annotations

import os

from common.cli import UserError

CONFIG = "config.yaml"
LATENT_CONFIG = "latent_config.json"
COMPLETE = "COMPLETE.json"
VERSIONS = {CONFIG: 1, LATENT_CONFIG: 2, COMPLETE: 1}
DATA_CARD = "data_card"


class RunFileError(UserError):
    """A run file this code cannot read: newer than it reads, or inconsistent (exit 2)."""


def version_of(kind: str, tree: dict) -> int:
    if "schema_version" in tree:
        return tree["schema_version"]
    return 0 if kind == LATENT_CONFIG and "method_config" not in tree else 1


def check_version(kind: str, tree: dict, path: str) -> int:
    """The file's version; one newer than this code reads is refused."""
    version, current = version_of(kind, tree), VERSIONS[kind]
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise RunFileError(f"{path}: schema_version {version!r} is no version (a whole number up to {current})")
    if version > current:
        raise RunFileError(f"{path}: schema_version {version!r} was written by a newer version of this code, which "
                           f"reads {kind} up to version {current}; update the code (git pull) to read it")
    return version


def upgrade(kind: str, tree: dict, path: str) -> dict:
    """``tree`` (a parsed ``kind`` file at ``path``) in the current version, without ``schema_version``."""
    version = check_version(kind, tree, path)
    tree = {k: v for k, v in tree.items() if k != "schema_version"}
    while version < VERSIONS[kind]:
        tree = STEPS[kind][version](tree, path)
        version += 1
    return tree


def stamped(kind: str, tree: dict) -> dict:
    """``tree`` as written: its schema version first."""
    return {"schema_version": VERSIONS[kind], **tree}


def keep_run_files(run_dir: str, run, ds_config: dict, shards, rank: int) -> None:
    """At a run's start: on every rank, refuse shards of another tokenizer than the run's; on rank
    0, write the resolved ``config.yaml`` and DeepSpeed JSON, and the data card if there is none."""
    import json

    from pipeline.engine.config import save_config

    check_data_card(shards, run_dir)
    if rank != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    save_config(run, os.path.join(run_dir, CONFIG))
    with open(os.path.join(run_dir, "ds_config.json"), "w", encoding="utf-8") as handle:
        json.dump(ds_config, handle, indent=2)
    save_data_card(shards, run_dir)


def check_data_card(shards, run_dir: str) -> None:
    """A run resumed on shards of another tokenizer than its data card's is refused (every rank
    checks, so every rank stops)."""
    from data_prep import read_manifest

    card = os.path.join(run_dir, DATA_CARD)
    if not os.path.isdir(card):
        return
    kept = read_manifest(card)["tokenizer"]["fingerprint"]
    if kept != shards.manifest["tokenizer"]["fingerprint"]:
        raise RunFileError(f"{shards.path}: tokenized with another tokenizer than the one {run_dir} was trained with "
                           f"({card}, fingerprint {kept[:12]}); resume on shards built with it "
                           f"(python -m data_prep build --tokenizer {card}/tokenizer ...)")


def save_data_card(shards, run_dir: str) -> None:
    """Keep ``shards``' manifest (its splits left out) and tokenizer in ``run_dir/data_card``, a
    shard directory without records, unless the run has one."""
    import json
    import shutil

    from data_prep.manifest import MANIFEST, TOKENIZER_DIR

    card = os.path.join(run_dir, DATA_CARD)
    if os.path.isdir(card):
        return
    tmp = f"{card}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(shards.path, shards.manifest["tokenizer"]["dir"]), os.path.join(tmp, TOKENIZER_DIR))
    manifest = {**shards.manifest, "splits": {}, "tokenizer": {**shards.manifest["tokenizer"], "dir": TOKENIZER_DIR},
                "card_of": shards.path}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
    os.replace(tmp, card)


def data_card(run_dir: str, run):
    """The run's data card (a ``ShardSet`` without splits); a run saved before cards: its shards
    at ``run.data`` (its config), which must still be there."""
    from data_prep import load_shards

    card = os.path.join(run_dir, DATA_CARD)
    if os.path.isdir(card):
        return load_shards(card)
    if run is None or not os.path.isdir(run.data):
        raise RunFileError(f"{run_dir}: no {DATA_CARD}/ (a run saved before runs kept one) and its shards are not at "
                           f"{getattr(run, 'data', '?')!r}; run from the folder training ran in, or give the data")
    return load_shards(run.data)


# ---------------------------------------------------------------- latent_config.json
def latent_0_to_1(latent: dict, path: str) -> dict:
    """Version 0 kept the method's options one by one (no ``method_config``), ``n_latents`` for
    ``num_latent``, and no field for the options added later: those at the defaults of that time
    (``jacobi_iterations`` 0 where the method config now says 3; the update was sequential)."""
    fields = {"name": latent["method"], "c_thought": latent["c_thought"], "num_latent": latent["n_latents"],
              "simcot": latent["simcot"], "max_latent_stage": 3, "pad_latent_to_max": True,
              "progressive_train": False, "latent_update": "sequential", "jacobi_iterations": 0,
              "remove_eos": True, "reference_attention": False}
    fields.update({k: latent[k] for k in fields if k in latent and k not in ("name", "num_latent")})
    return {**latent, "method_config": fields}


def latent_1_to_2(latent: dict, path: str) -> dict:
    """Version 1 repeated what ``method_config`` and ``stage`` give beside them (``method``,
    ``simcot``, ``n_latents``, ``reference_attention``, ``projection_shape``); version 2 keeps the
    method config, the vocabulary facts and the stage. A repeat that disagrees is refused; the
    projection's shape from a file whose method config predates its options moves into it."""
    from pipeline.latent.methods import MethodConfig

    method = dict(latent["method_config"])
    shape = latent.get("projection_shape") or {}
    method.setdefault("prj_dim", shape.get("inner") or 0)
    method.setdefault("prj_layernorm", shape.get("layernorm", True))
    cfg = MethodConfig(**method)
    facts = {"method": cfg.name, "simcot": cfg.simcot, "reference_attention": cfg.reference_attention,
             "n_latents": cfg.stage_latents(latent["stage"]),
             "projection_shape": {"inner": cfg.prj_dim, "layernorm": cfg.prj_layernorm}}
    for key, derived in facts.items():
        if key in latent and latent[key] != derived:
            raise RunFileError(f"{path}: {key} {latent[key]!r} disagrees with method_config and stage, which give "
                               f"{derived!r}; the file was edited by hand")
    return {**{k: v for k, v in latent.items() if k not in facts}, "method_config": method}


STEPS = {CONFIG: {}, LATENT_CONFIG: {0: latent_0_to_1, 1: latent_1_to_2}, COMPLETE: {}}
