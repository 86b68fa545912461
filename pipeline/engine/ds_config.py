"""Resolve a DeepSpeed JSON template against the run: no "auto" survives to ``deepspeed.initialize``.

Batch sizes come from the run config and the world size; bucket sizes from the model's hidden
size (the formulas HF's integration uses) and its trainable parameters; the optimizer from the
run's lr/betas/weight decay.
The resolved JSON is saved in the run directory, and the effective global batch is printed.
"""
from __future__ import annotations

import copy
import json

from pipeline.engine.config import RunConfig


class DeepSpeedConfigError(ValueError):
    pass


# Gradient buckets: one reduce for a small model (a bucket of hidden^2 elements meant one
# collective per parameter), at most 5e7 elements (200 MB of fp32 gradients) for a large one.
MAX_REDUCE_BUCKET = 5 * 10**7


def resolve_ds_config(template: dict | str, run: RunConfig, world_size: int, hidden_size: int,
                      on_cuda: bool, bf16: bool, trainable_params: int = 0) -> dict:
    if isinstance(template, str):
        with open(template, encoding="utf-8") as handle:
            template = json.load(handle)
    cfg = copy.deepcopy(template)
    t = run.train
    values = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in values.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    per_step = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world_size
    if cfg["train_batch_size"] != per_step:
        raise DeepSpeedConfigError("train_batch_size != micro batch x grad accum x world size in the DeepSpeed JSON")
    if "bf16" in cfg and cfg["bf16"].get("enabled") == "auto":
        cfg["bf16"]["enabled"] = bf16
    params = cfg.get("optimizer", {}).get("params", {})
    offloaded = "offload_optimizer" in cfg.get("zero_optimization", {})
    for key, value in {"lr": t.lr, "betas": list(t.betas), "weight_decay": t.weight_decay,
                       # torch's AdamW on CPU: DeepSpeed's fused CPU Adam costs a 61 s JIT compile
                       "torch_adam": not on_cuda and not offloaded}.items():
        if params.get(key) == "auto":
            params[key] = value
    zero = cfg.get("zero_optimization", {})
    for key, value in {"reduce_bucket_size": max(hidden_size * hidden_size, min(trainable_params, MAX_REDUCE_BUCKET)),
                       "allgather_bucket_size": max(hidden_size * hidden_size, 5 * 10**7),
                       "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                       "stage3_param_persistence_threshold": 10 * hidden_size}.items():
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = [path for path, value in _walk(cfg) if value == "auto"]
    if leftover:
        raise DeepSpeedConfigError(f"cannot resolve 'auto' for {', '.join(leftover)}; set a value in the JSON")
    return cfg


def streamed_zero_settings(layer_params: int, largest_module_params: int) -> dict[str, int]:
    """ZeRO-3 keys that bound the live parameters to about two layers (the one in use and the one
    prefetched) plus the largest module, for the ``streamed`` gather policy."""
    return {"stage3_max_live_parameters": 2 * layer_params + largest_module_params,
            "stage3_prefetch_bucket_size": layer_params,
            "stage3_max_reuse_distance": layer_params}


def _walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else key)
    else:
        yield path, node


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
