"""A release's files: its weights in whichever layout it was saved, and its (maybe empty) config.

    release = read_release("internlm/SIM_COT-LLaMA3-CODI-1B")      # or a local directory / file
    release.state, release.config, release.origin

Layouts read: ``model.safetensors``; sharded safetensors with ``model.safetensors.index.json``;
``pytorch_model.bin``; Coconut's ``checkpoint_N`` (``torch.save`` of a state dict; the highest N
unless a file is named). Pickles load with ``weights_only=True``. A ``config.json`` of 0 bytes (as
the SIM-CoT releases ship) reads as None: the base's config then comes from ``--base``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch

from common.cli import UserError

INDEX = "model.safetensors.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
CHECKPOINT = re.compile(r"checkpoint_(\d+)$")


@dataclass
class Release:
    directory: str
    state: dict[str, torch.Tensor]
    config: dict | None = None           # its config.json (None: absent or empty)
    tokenizer_dir: str | None = None     # where a tokenizer was shipped with it
    origin: dict = field(default_factory=dict)   # the source named and the weight files read, in order


def read_release(source: str) -> Release:
    """The release at ``source``: a directory, one weight file, or a hub id (downloaded)."""
    path = source if os.path.exists(source) else _download(source)
    if os.path.isfile(path):
        directory, files = os.path.dirname(path) or ".", [path]
    else:
        directory, files = path, weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for name in files:
        for key, value in _read(name).items():
            if key in state:
                raise UserError(f"{name}: tensor {key} is also in an earlier file of the release; a release "
                                "holds each tensor once")
            state[key] = value
    return Release(directory, state, _config(directory), _tokenizer_dir(directory),
                   {"source": source, "files": [os.path.basename(f) for f in files]})


def weight_files(directory: str) -> list[str]:
    """The files holding a release's weights, by the first layout found."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if missing:
            raise UserError(f"{index} names shards that are not there: {', '.join(missing)}")
        return [os.path.join(directory, s) for s in shards]
    for name in SINGLE_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            return [os.path.join(directory, name)]
    numbered = [(int(m.group(1)), name) for name in os.listdir(directory) if (m := CHECKPOINT.match(name))]
    if numbered:
        return [os.path.join(directory, max(numbered)[1])]
    raise UserError(f"{directory}: no weights found (looked for {INDEX}, {', '.join(SINGLE_FILES)} and "
                    "Coconut's checkpoint_N); give the release's directory or one weight file")


def _read(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:         # pickle errors name classes, not the file: say which file and why
        raise UserError(f"{path}: not a weights file torch.load can read with weights_only=True "
                        f"({' '.join(str(err).split())[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _config(directory: str) -> dict | None:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _tokenizer_dir(directory: str) -> str | None:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    return directory if any(os.path.isfile(os.path.join(directory, n)) for n in names) else None


def _download(hub_id: str) -> str:
    """A hub repository's files (where a network is)."""
    if os.path.isabs(hub_id) or hub_id.startswith(".") or hub_id.count("/") != 1:
        raise UserError(f"--from {hub_id}: no such file or directory (and not a hub id of the form owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(hub_id, allow_patterns=["*.safetensors", "*.json", "*.bin", "checkpoint_*",
                                                         "*.model", "*.txt"])
    except Exception as err:         # offline, gated, or no such repository: one line with the cause
        raise UserError(f"--from {hub_id}: could not download it ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}); give a local directory instead") from None
