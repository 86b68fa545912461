"""One ZeRO-3 parameter all-gather per step, whatever the number of latent passes.

A latent step calls every module K+2 times. ZeRO-3 releases a parameter after each call unless
its recorded module trace says it is reused soon; the trace is only valid from the second step
on and is invalidated whenever the call sequence changes (a curriculum stage adds latents, a
validation pass runs), so such steps re-gather the model K+2 times (ZERO3_GATHER.md, measured).
Gathering every parameter once around forward *and* backward, and pinning it so the per-module
hooks do not release it, gives exactly one gather per step on every step (variant C there).
Cost: the whole model in the compute dtype stays gathered on each rank during the step (what
``stage3_max_reuse_distance`` retention costs too); gradients and optimizer states stay partitioned.
DeepSpeed 0.19.8: ``ds_active_sub_modules`` is the set the coordinator checks before releasing.
"""
from __future__ import annotations

from contextlib import contextmanager

_PIN = -12345  # a sentinel "sub-module" that is always active while pinned


@contextmanager
def whole_model_gathered(engine, enabled: bool = True):
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_active_sub_modules")]
    if not enabled or not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.add(_PIN)
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(_PIN)
