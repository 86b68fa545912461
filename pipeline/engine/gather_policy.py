"""How ZeRO-3 parameters are gathered during a step: a decision of the memory plan (pipeline/engine/memory_plan.py).

    engine = deepspeed.initialize(...)[0]
    apply_gather_policy(engine, plan.gather_policy)
    with step_gather(engine, plan.gather_policy):
        engine.backward(engine(batch)["total"])
    engine.step()

``gathered`` (the plan picks it when the whole model fits on a rank next to everything else):
every parameter is all-gathered once around forward *and* backward, so the gather volume is one
model per step whatever the number of latent passes, on the first step and across curriculum
changes too (DeepSpeed's trace-based reuse breaks on both; measured in the README, P3). DeepSpeed's
per-module fetch/release hooks are then removed: with every parameter already gathered they only
cost time, and a latent step calls every module K+2 times (profiled in the README, P8: they were
about half of the engine's overhead). The per-parameter gradient hooks stay: they reduce and
partition the gradients as before, so losses and gradients are bit-identical to the hooked path
(tested). Gradients and optimizer states stay partitioned.

``streamed``: DeepSpeed's own per-module fetch and release with a bounded live window (the
plan sets ``stage3_max_live_parameters`` / prefetch / reuse distance). Only a single-pass method
(CoT, No-CoT) gains memory from it: DeepSpeed keeps a module that runs in several latent passes
gathered until its last backward use, so a latent step peaks at the whole model either way
(ZeRO-3 trace analysis, README).
"""
from __future__ import annotations

from contextlib import contextmanager

GATHERED = "gathered"
STREAMED = "streamed"
REPLICATED = "replicated"      # ZeRO-0/1/2: parameters are never partitioned, nothing to gather
POLICIES = (GATHERED, STREAMED, REPLICATED)


def _zero3_params(engine) -> list:
    return [p for p in engine.module.parameters() if hasattr(p, "ds_active_sub_modules")]


def apply_gather_policy(engine, policy: str) -> None:
    """Once, after ``deepspeed.initialize``: under ``gathered`` drop DeepSpeed's module hooks."""
    if policy not in POLICIES:
        raise ValueError(f"gather policy {policy!r}: expected one of {', '.join(POLICIES)}")
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if policy == GATHERED and offload is not None:
        # DeepSpeed 0.19.8: the forward/backward module hooks and the root's trace reset live in
        # DeepSpeedZeRoOffload; the gradient hooks live in the stage-3 optimizer and are kept.
        offload._remove_module_hooks()
        offload.forward_hooks.clear()
        offload.backward_hooks.clear()


@contextmanager
def step_gather(engine, policy: str):
    """Around one forward (+ backward): the whole model gathered under ``gathered``, else nothing."""
    params = _zero3_params(engine) if policy == GATHERED else []
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield
