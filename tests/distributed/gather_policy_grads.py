"""Helper for test_gather_policy: one ZeRO-3 step of a method under each gather policy, and under
``gathered`` with gradients reduced after backward in buckets of one layer (1 rank, in this
process), there also over two micro-batches of the same batch (gradient accumulation) and with
the gradient norm taken both ways (grad_norm.py's, DeepSpeed's), and the same step in plain
PyTorch eager from the same weights; saves every loss and full gradient, and the most parameters
``streamed`` held gathered in a second step (the first records DeepSpeed's trace and releases
everything at once). For CODI + SIM-CoT, also the gathered step with the compiled forward
(``model.body_forward=compiled``) of a 1-layer model under the CODI reference's attention, and its
plain step.

    python -m tests.distributed.gather_policy_grads METHOD OUT.pt
"""
import dataclasses
import sys

import torch

from benchmarks.overhead import CASES, HIDDEN, VOCAB, batches, reasoner
from benchmarks.zero import LiveParams
from pipeline.engine.distributed import init_distributed, teardown
from pipeline.engine.gather_policy import GATHERED, STREAMED, apply_gather_policy, step_gather
from pipeline.engine.grad_reduce import AFTER_BACKWARD, OVERLAPPED, apply_grad_reduce
from pipeline.latent import lean_forward
from pipeline.latent.batch import Batch
from pipeline.latent.methods import MethodConfig

LAYERS = 4         # the streamed window (about three layers and the embeddings) is then below the base
VARIANTS = {"streamed": (STREAMED, OVERLAPPED, 1), "gathered": (GATHERED, OVERLAPPED, 1),
            "after_backward": (GATHERED, AFTER_BACKWARD, 1), "accumulated": (GATHERED, AFTER_BACKWARD, 2)}
COMPILED_FOR = "codi+simcot"     # its step compiles every kind of pass: question, columns, tail, teacher, decoder
COMPILED = dataclasses.replace(CASES[COMPILED_FOR][0], reference_attention=True)   # a 4-D mask, then none


def zero3_step(method: str, policy: str, grad_reduce: str, batch: Batch, body_forward: str = "auto",
               layers: int = LAYERS, cfg: MethodConfig | None = None, micro_batches: int = 1) -> tuple:
    """-> (losses, full gradients, the starting weights, under ``streamed`` the peak of gathered
    elements in a second step, else the gradient norms (ours, DeepSpeed's)). ``micro_batches``: the
    batch that many times, accumulated (each loss scaled by 1 / that: exact for 2)."""
    import deepspeed
    from deepspeed.runtime.comm.coalesced_collectives import reduce_scatter_coalesced
    from deepspeed.runtime.zero import stage3
    from deepspeed.utils import safe_get_full_grad
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.engine.config import load_config
    from pipeline.engine.ds_config import resolve_ds_config, streamed_zero_settings

    cfg = cfg or CASES[method][0]
    config = load_config(None, ["train.micro_batch_size=4"])
    ds = resolve_ds_config("ds_configs/zero3.json", config, 1, HIDDEN, on_cuda=False, bf16=False)
    layer = sum(p.numel() for p in reasoner(cfg, layers).base.model.layers[0].parameters())
    if policy == STREAMED:       # as the trainer sets it
        ds["zero_optimization"].update(streamed_zero_settings(layer, VOCAB * HIDDEN))
    if grad_reduce == AFTER_BACKWARD:       # several buckets, not one
        ds["zero_optimization"]["reduce_bucket_size"] = layer
    ds["gradient_accumulation_steps"] = micro_batches
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * micro_batches
    keep_alive = HfDeepSpeedConfig(ds)  # noqa: F841  (zero.Init: both policies start from the same weights)
    model = reasoner(cfg, layers=layers, body_forward=body_forward)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    apply_gather_policy(engine, policy)
    apply_grad_reduce(engine, grad_reduce)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        weights = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    for _ in range(micro_batches):
        with step_gather(engine, policy):
            losses = engine(batch)
            engine.backward(losses["total"])
    # after_backward's one-rank identity is DeepSpeed's collective again once the reduction is done
    assert stage3.reduce_scatter_coalesced is reduce_scatter_coalesced
    # every gradient reduced into ZeRO's partitions (safe_get_full_grad would return one left behind)
    assert all(p.grad is None for p in params), [n for n, p in engine.module.named_parameters() if p.grad is not None]
    grads = {name: safe_get_full_grad(p).clone() for name, p in engine.module.named_parameters()}
    if policy != STREAMED:
        optimizer = engine.optimizer
        norms = [(optimizer.get_grad_norm_direct(optimizer.averaged_gradients[i], group),
                  type(optimizer).get_grad_norm_direct(optimizer, optimizer.averaged_gradients[i], group))
                 for i, group in enumerate(optimizer.fp16_groups)]
        return {k: v.item() for k, v in losses.items()}, grads, weights, norms
    engine.step()
    with LiveParams(params) as live:
        engine.backward(engine(batch)["total"])
    return {k: v.item() for k, v in losses.items()}, grads, weights, live.peak


def plain_step(method: str, batch: Batch, weights: dict, layers: int = LAYERS,
               cfg: MethodConfig | None = None) -> tuple[dict, dict]:
    cfg = cfg or CASES[method][0]
    model = reasoner(cfg, layers=layers)
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
    for variant, (policy, grad_reduce, micro_batches) in VARIANTS.items():
        losses, grads, weights, extra = zero3_step(method, policy, grad_reduce, batch, micro_batches=micro_batches)
        result[variant] = {"losses": losses, "grads": grads, "peak" if policy == STREAMED else "norms": extra}
    if method == COMPILED_FOR:       # 1 layer (it compiles in a fraction of the time), its own plain step;
        lean_forward.COLUMNS_PER_GRAPH = 2      # 5 passes: graphs of 2 and of 1, both smaller to compile than 5's
        losses, grads, one_layer, _ = zero3_step(method, GATHERED, AFTER_BACKWARD, batch, "compiled", 1, COMPILED)
        result["compiled"] = {"losses": losses, "grads": grads,
                              "plain": plain_step(method, batch, one_layer, 1, COMPILED)}
    losses, grads = plain_step(method, batch, weights)
    model = reasoner(cfg, LAYERS)
    result["plain"] = {"losses": losses, "grads": grads}
    result["sizes"] = {"layer": sum(p.numel() for p in model.base.model.layers[0].parameters()),
                       "embedding": VOCAB * HIDDEN, "base": sum(p.numel() for p in model.base.parameters())}
    torch.save(result, out)
    teardown()
