"""Before the engine is built: the DeepSpeed JSON resolved, the memory plan run, its choices taken.

    ds_config, gather_policy, grad_reduce = plan_engine(run, vocab, world, device, bf16, say)

Rank 0's plan decides for every rank: ranks that chose differently would not meet in the same
collectives.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from common.cli import UserError
from pipeline.engine.config import RunConfig
from pipeline.engine.ds_config import resolve_ds_config, streamed_zero_settings, zero_stage
from pipeline.engine.gather_policy import GATHERED, REPLICATED, STREAMED
from pipeline.engine.grad_reduce import AFTER_BACKWARD, OVERLAPPED
from pipeline.engine.guard import check_deepspeed_skips
from pipeline.engine.memory_plan import local_hardware, make_plan
from pipeline.engine.model_shapes import model_sizes
from pipeline.latent.vocab import Vocab


class PlanError(RuntimeError):
    """The memory plan says this run does not fit its hardware."""


class EngineChoice(NamedTuple):
    ds_config: dict             # resolved: no "auto" left
    gather_policy: str          # pipeline/engine/gather_policy.py
    grad_reduce: str            # pipeline/engine/grad_reduce.py


def plan_engine(run: RunConfig, vocab: Vocab, world: int, device: torch.device, bf16: bool, say) -> EngineChoice:
    """Size the model on the meta device, resolve the DeepSpeed JSON, run the memory plan (``say``
    prints it) and take its gather policy and gradient reduction; a plan that does not fit raises
    :class:`PlanError` (exit 3), a setting that cannot run a ``UserError`` (exit 2)."""
    sizes = model_sizes(run, vocab.size, vocab.original)
    ds_config = resolve_ds_config(run.deepspeed, run, world, sizes.hidden, device.type == "cuda", bf16,
                                  sizes.trainable)
    check_deepspeed_skips(ds_config, run.deepspeed)
    plan = make_plan(run, sizes, ds_config, local_hardware(world, device))
    say(plan.render())
    decision = [plan.fits, plan.policy, plan.grad_reduce, f"{plan.reason}; {'; '.join(plan.advice)}"]
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    fits, policy, grad_reduce, why = decision
    if not fits and run.train.memory_plan == "enforce":
        raise PlanError(f"{why} (or train.memory_plan=warn to try anyway)")
    stage = zero_stage(ds_config)
    chosen = run.train.zero3_gather
    gather_policy = REPLICATED if stage < 3 else (policy if chosen == "auto" else chosen)
    if gather_policy == STREAMED:
        ds_config["zero_optimization"].update(streamed_zero_settings(sizes.layer, sizes.largest_module))
    reduce = run.train.grad_reduce
    if reduce == "auto":        # the plan's choice holds for the policy it picked
        reduce = grad_reduce if gather_policy == policy == GATHERED else OVERLAPPED
    if reduce == AFTER_BACKWARD and gather_policy != GATHERED:
        raise UserError(f"train.grad_reduce=after_backward goes with ZeRO-3's gathered policy, not "
                        f"{gather_policy} (ZeRO-{stage}, {run.deepspeed}); set train.grad_reduce=overlapped")
    say(f"ZeRO-{stage} parameters: {gather_policy} ({_chosen_by(run, 'zero3_gather')}); gradients "
        f"reduced {reduce.replace('_', ' ')} ({_chosen_by(run, 'grad_reduce')})")
    _check_body_forward(run, gather_policy)
    return EngineChoice(ds_config, gather_policy, reduce)


def _check_body_forward(run: RunConfig, gather_policy: str) -> None:
    """Before the model is built: a compiled forward reads the weights as plain tensors, which
    ZeRO-3 holds only under the gathered policy (its module hooks removed for the step)."""
    if run.model.body_forward == "compiled" and gather_policy not in (GATHERED, REPLICATED):
        raise UserError(f"model.body_forward=compiled needs ZeRO-3's gathered policy (this run: "
                        f"{gather_policy}); set model.body_forward=lean, or train.zero3_gather=gathered "
                        "where the memory plan allows it")


def _chosen_by(run: RunConfig, key: str) -> str:
    return "memory plan" if getattr(run.train, key) == "auto" else f"train.{key}"
