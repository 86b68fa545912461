"""Checkpoints that count only once every rank has written them.

Layout: ``runs/NAME/checkpoints/<tag>/`` (DeepSpeed's per-rank ZeRO files, our per-rank RNG
files, ``COMPLETE.json`` with its schema version, every file's size and sha256 and the trainer's
progress) and ``checkpoints/latest`` (the
newest complete tag, replaced atomically). A crash mid-save leaves a tag without
``COMPLETE.json``; it is never loaded, and ``latest`` still names the previous one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import NamedTuple

import torch
import torch.distributed as dist

from common.hashing import sha256_file
from pipeline.run_files import COMPLETE, stamped, upgrade


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save(engine, ckpt_dir: str, tag: str, client_state: dict, checksums: bool = True) -> None:
    """Every rank calls this. Returns once ``latest`` names ``tag`` on every rank's view."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()                       # every rank has written its shards
    if rank == 0:
        mark_complete(ckpt_dir, tag, client_state, checksums)
    if dist.is_initialized():
        dist.barrier()


def mark_complete(ckpt_dir: str, tag: str, client_state: dict, checksums: bool = True) -> None:
    """Record every file's size and sha256, then point ``latest`` at the tag (both atomic)."""
    tag_dir = os.path.join(ckpt_dir, tag)
    files = {}
    for root, _, names in os.walk(tag_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            files[os.path.relpath(path, tag_dir)] = {"bytes": os.path.getsize(path),
                                                     "sha256": sha256_file(path) if checksums else None}
    complete = stamped(COMPLETE, {"tag": tag, "files": files, "client_state": _jsonable(client_state)})
    _write_atomic(os.path.join(tag_dir, COMPLETE), json.dumps(complete, indent=1))
    _write_atomic(os.path.join(ckpt_dir, "latest"), tag)


def _jsonable(state: dict) -> dict:
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, type(None)))}


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete tags, oldest first (by the step recorded in COMPLETE.json)."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = []
    for name in os.listdir(ckpt_dir):
        if is_complete(ckpt_dir, name):
            tags.append((read_complete(ckpt_dir, name)["client_state"].get("global_step", 0), name))
    return [name for _, name in sorted(tags)]


def epoch_tag(epoch: int) -> str:
    """The tag of the checkpoint saved at the end of ``epoch`` (0-based; a Coconut stage per epoch)."""
    return f"epoch{epoch}"


def client_state(ckpt_dir: str, tag: str) -> dict:
    """What the trainer recorded with a complete checkpoint (epoch, step, stage, ...)."""
    return read_complete(ckpt_dir, tag)["client_state"]


def read_complete(ckpt_dir: str, tag: str) -> dict:
    """A complete checkpoint's ``COMPLETE.json`` (one newer than this code reads is refused)."""
    path = os.path.join(ckpt_dir, tag, COMPLETE)
    with open(path, encoding="utf-8") as handle:
        return upgrade(COMPLETE, json.load(handle), path)


def is_complete(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, COMPLETE))


def latest_tag(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, "latest")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            tag = handle.read().strip()
        if is_complete(ckpt_dir, tag):
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def verify(ckpt_dir: str, tag: str) -> list[str]:
    """Files whose size or sha256 differs from COMPLETE.json."""
    tag_dir = os.path.join(ckpt_dir, tag)
    marker = os.path.join(tag_dir, COMPLETE)
    if not os.path.isfile(marker):
        return [f"{tag_dir}: no {COMPLETE}; the save did not finish on every rank"]
    files = read_complete(ckpt_dir, tag)["files"]
    problems = []
    for rel, info in files.items():
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
        elif os.path.getsize(path) != info["bytes"] or (info["sha256"] and sha256_file(path) != info["sha256"]):
            problems.append(f"{path}: differs from {COMPLETE} (corrupted or changed)")
    return problems


def load(engine, ckpt_dir: str, tag: str) -> dict:
    """Load ``tag`` (weights, optimizer, schedule, RNG) on every rank after checking its files;
    returns the client state."""
    problems = verify(ckpt_dir, tag)
    if problems:
        raise CheckpointError("; ".join(problems))
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise CheckpointError(f"{ckpt_dir}/{tag}: DeepSpeed could not load it")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state or {}


def rotate(ckpt_dir: str, keep_last: int, keep: set[str]) -> list[str]:
    """Delete complete tags beyond the newest ``keep_last`` (``keep``, e.g. the best, stays). Rank 0 only."""
    tags = complete_tags(ckpt_dir)
    doomed = [t for t in tags[:-keep_last] if t not in keep] if keep_last > 0 else []
    for tag in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
    return doomed


def init_source(path: str) -> tuple[str, str]:
    """``checkpoint.init_from`` -> (checkpoint dir, tag): a run's checkpoint dir means its latest
    complete tag; a tag dir inside one (``.../checkpoints/epoch3``) means that tag."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return os.path.dirname(path), os.path.basename(path)
    tag = latest_tag(path)
    if tag is None:
        raise CheckpointError(f"checkpoint.init_from={path}: no complete checkpoint there "
                              f"(give a run's checkpoints dir or a tag dir holding {COMPLETE})")
    return path, tag


def consolidated(ckpt_dir: str, tag: str) -> dict:
    """The fp32 state dict of a tag whose files match ``COMPLETE.json``, consolidated across
    ranks by DeepSpeed's own ``zero_to_fp32`` (any ZeRO stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    problems = verify(ckpt_dir, tag)
    if problems:
        raise CheckpointError("; ".join(problems))
    return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)


def load_exact(module, weights: dict, where: str, cut_vocab_rows: bool = False) -> None:
    """Every model key filled (a tied LM head may be absent) and no weight left over.
    ``cut_vocab_rows``: a step decoder's tables keep only the rows it has (its weights may come
    from a base with the added tokens, or a run made when decoders had them)."""
    if cut_vocab_rows:
        weights = _cut_rows(weights, module.state_dict())
    missing, unexpected = module.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if getattr(module.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{where}: its weights do not fit this model "
                              f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]})")


def _cut_rows(weights: dict, own: dict) -> dict:
    """Tables with more rows than the module's (and the same width) cut to its rows."""
    def fit(key, value):
        shape = own[key].shape if key in own else None
        if shape is not None and value.dim() == 2 and value.shape[1:] == shape[1:] and value.shape[0] > shape[0]:
            return value[:shape[0]]
        return value
    return {key: fit(key, value) for key, value in weights.items()}


def take(state: dict, prefix: str) -> dict:
    """Pop every key under ``prefix`` from ``state`` -> those tensors, the prefix cut."""
    return {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}


class Initialised(NamedTuple):
    """What ``checkpoint.init_from`` started a run from."""
    source: str                  # the checkpoint's dir/tag or the merged directory
    decoder_origin: str          # where the step decoder's weights came from (:func:`decoder_weights`)
    projection: dict             # CODI's projection weights in the source ({}: none)


def load_base_weights(base, decoder, init_from: str, decoder_init: str = "pretrained") -> Initialised:
    """Start the base LM (and the step decoder, if any) from an earlier run's checkpoint or a merged
    model directory (``pipeline.merge``'s, ``pipeline.import_reference``'s). Works across method
    changes (e.g. Coconut -> Coconut+SIM-CoT, where the module and its ZeRO partitions differ) and
    under ZeRO-3 (rank 0 writes, then broadcast); the projection's weights are returned for the
    caller to load once the reasoner that holds it exists."""
    source, weights = init_weights(init_from)
    _load_gathered(base, weights["base."], source)
    chosen, origin = decoder_weights(weights, decoder_init)
    if decoder is not None and chosen is not None:
        _load_gathered(decoder, chosen, source, cut_vocab_rows=True)
    return Initialised(source, origin, weights["projection."])


def init_weights(init_from: str) -> tuple[str, dict[str, dict]]:
    """``checkpoint.init_from`` -> (what it names, its weights by part: ``base.``, ``step_decoder.``,
    ``projection.``)."""
    from pipeline.inference.merged import LATENT_CONFIG, PROJECTION, STEP_DECODER
    from pipeline.releases.files import read_release

    if os.path.isfile(os.path.join(init_from, LATENT_CONFIG)):
        decoder_dir, projection = os.path.join(init_from, STEP_DECODER), os.path.join(init_from, PROJECTION)
        from safetensors.torch import load_file

        return init_from, {"base.": read_release(init_from).state,
                           "step_decoder.": read_release(decoder_dir).state if os.path.isdir(decoder_dir) else {},
                           "projection.": load_file(projection) if os.path.isfile(projection) else {}}
    ckpt_dir, tag = init_source(init_from)
    state = consolidated(ckpt_dir, tag)
    return f"{ckpt_dir}/{tag}", {prefix: take(state, prefix) for prefix in ("base.", "step_decoder.", "projection.")}


def load_projection(projection, weights: dict, source: str) -> None:
    """CODI's projection from ``init_from``'s weights. Built outside ZeRO-3's ``zero.Init``, it is
    no partitioned parameter yet: every rank loads the same weights (a rank-0 write would leave the
    other ranks' copies, which DeepSpeed later partitions, as they were)."""
    if any(hasattr(p, "ds_id") for p in projection.parameters()):
        _load_gathered(projection, weights, source)
        return
    missing, unexpected = projection.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: its projection does not fit this run's (missing {missing}, unexpected "
                              f"{unexpected}); set method.prj_dim / method.prj_layernorm as the source had them")


def decoder_weights(weights: dict[str, dict], decoder_init: str) -> tuple[dict | None, str]:
    """The step decoder's starting weights when a run starts from a checkpoint: the checkpoint's own
    decoder (continuing a SIM-CoT run); else, with ``decoder_init=pretrained`` (the reference), none:
    the decoder keeps the weights it was built with (the raw pretrained model, never the
    checkpoint's fine-tuned base); with ``decoder_init=base``, the checkpoint's base weights."""
    if weights["step_decoder."]:
        return weights["step_decoder."], "the checkpoint's step decoder"
    if decoder_init == "base":
        return weights["base."], "the checkpoint's base (method.decoder_init=base)"
    return None, "the pretrained weights (method.decoder_init=pretrained)"


def _load_gathered(module, weights: dict, where: str, cut_vocab_rows: bool = False) -> None:
    import deepspeed

    rank = dist.get_rank() if dist.is_initialized() else 0
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        if rank == 0:
            load_exact(module, weights, where, cut_vocab_rows)
