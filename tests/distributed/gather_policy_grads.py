"""Helper for test_gather_policy: one ZeRO-3 step of a method under each gather policy (1 rank, in
this process) and the same step in plain PyTorch eager from the same weights; saves every
loss and full gradient.

    python -m tests.distributed.gather_policy_grads METHOD OUT.pt
"""
import sys

import torch

from benchmarks.overhead import CASES, batches, reasoner
from pipeline.engine.distributed import init_distributed, teardown
from pipeline.engine.gather_policy import GATHERED, STREAMED, apply_gather_policy, step_gather
from pipeline.latent.batch import Batch


def zero3_step(method: str, policy: str, batch: Batch) -> tuple[dict, dict, dict]:
    """-> (losses, full gradients, the starting weights)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.engine.config import load_config
    from pipeline.engine.ds_config import resolve_ds_config

    cfg, _ = CASES[method]
    config = load_config(None, ["train.micro_batch_size=4"])
    ds = resolve_ds_config("ds_configs/zero3.json", config, 1, 64, on_cuda=False, bf16=False)
    keep_alive = HfDeepSpeedConfig(ds)  # noqa: F841  (zero.Init: both policies start from the same weights)
    model = reasoner(cfg, layers=2)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    apply_gather_policy(engine, policy)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        weights = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    with step_gather(engine, policy):
        losses = engine(batch)
        engine.backward(losses["total"])
    grads = {name: safe_get_full_grad(p) for name, p in engine.module.named_parameters()}
    return {k: v.item() for k, v in losses.items()}, grads, weights


def plain_step(method: str, batch: Batch, weights: dict) -> tuple[dict, dict]:
    cfg, _ = CASES[method]
    model = reasoner(cfg, layers=2)
    model.load_state_dict(weights)
    losses = model(batch)
    losses["total"].backward()
    return {k: v.item() for k, v in losses.items()}, {name: p.grad for name, p in model.named_parameters()}


if __name__ == "__main__":
    method, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    init_distributed()
    cfg, stage = CASES[method]
    batch = batches(cfg, stage, n=1)[0]
    result = {}
    for policy in (STREAMED, GATHERED):
        losses, grads, weights = zero3_step(method, policy, batch)
        result[policy] = {"losses": losses, "grads": grads}
    losses, grads = plain_step(method, batch, weights)
    result["plain"] = {"losses": losses, "grads": grads}
    torch.save(result, out)
    teardown()
