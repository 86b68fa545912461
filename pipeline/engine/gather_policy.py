"""How ZeRO-3 parameters are gathered during a step: a decision of the memory plan (pipeline/engine/memory_plan.py).

    engine = deepspeed.initialize(...)[0]
    apply_gather_policy(engine, plan.gather_policy)
    with step_gather(engine, plan.gather_policy):
        engine.backward(engine(batch)["total"])
    engine.step()

``gathered`` (the plan picks it when the whole model fits on a rank next to everything else):
every parameter is all-gathered once around forward *and* backward, so the gather volume is one
model per step whatever the number of latent passes, on the first step and across curriculum
changes too (DeepSpeed's trace-based reuse breaks on both). DeepSpeed's per-module fetch/release
hooks are then removed: with every parameter already gathered they only cost time, and a latent
step calls every module K+2 times. Gradients are reduced and partitioned as ``train.grad_reduce``
says (grad_reduce.py); losses and gradients are bit-identical to plain PyTorch's (tested).
Gradients and optimizer states stay partitioned. On a partition group of one rank (one GPU, one
CPU process) a parameter's partition holds all of it, so the gather is that partition seen in the
parameter's shape (no buffer, no copy): DeepSpeed's all-gather and its walk over every module to
release them are a fixed host cost per step there for an identity (benchmark P8).

``streamed`` (the plan's choice when the whole model does not fit): DeepSpeed's own per-module
fetch and release with a bounded live window (the plan sets ``stage3_max_live_parameters`` /
prefetch / reuse distance), *per pass*: a module's parameters are released after the backward
of each of its calls. DeepSpeed counts a module's pending input gradients in one counter that
every forward call resets, so a module called in K+1 latent passes would be released after the
backward of its last call only, then re-fetched and kept to the end of backward: the whole base
LM would stay gathered. :func:`_release_per_call` gives each call its own counter; the peak is then
about three layers plus the embeddings (tested, LoRA with checkpointing included; under HF's
per-layer checkpointing DeepSpeed already releases per pass, the recompute being a fresh call).
The cost is the gather volume: every pass gathers each layer again, in forward and in backward.
Measurements: benchmarks (P3, P8).

The DeepSpeed internals used are named through ``deepspeed_internals.internal``: a DeepSpeed
without one is refused with the setting that avoids it.
"""
from __future__ import annotations

from contextlib import contextmanager
from weakref import WeakKeyDictionary

import torch

from pipeline.engine.deepspeed_internals import (
    ENFORCE,
    Check,
    DeepSpeedInternalError,
    check_fields,
    check_version,
    internal,
)
from pipeline.engine.grad_norm import one_rank

GATHERED = "gathered"
STREAMED = "streamed"
REPLICATED = "replicated"      # ZeRO-0/1/2: parameters are never partitioned, nothing to gather
POLICIES = (GATHERED, STREAMED, REPLICATED)


_GATHERS: WeakKeyDictionary = WeakKeyDictionary()       # engine -> how step_gather gathers its parameters


def _zero3_params(engine) -> list:
    return [p for p in engine.module.parameters() if hasattr(p, "ds_active_sub_modules")]


def apply_gather_policy(engine, policy: str, check: Check = ENFORCE, one_rank_partitions: bool = True) -> None:
    """Once, after ``deepspeed.initialize``: under ``gathered`` drop DeepSpeed's module hooks,
    under ``streamed`` make them release after every call's backward. ``check``: what an untested
    DeepSpeed version gets (``train.deepspeed_check``); ``one_rank_partitions=False``: DeepSpeed's
    own gather even on a group of one rank (what the partitions-as-parameters path is tested
    against)."""
    if policy not in POLICIES:
        raise ValueError(f"gather policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if policy == REPLICATED:
        return
    check_version(check)
    needed = f"train.zero3_gather={policy} (set train.zero3_gather to the other policy, or use ZeRO-1/2)"
    # the module hooks and the root's trace reset live in DeepSpeedZeRoOffload; the gradient
    # hooks in the stage-3 optimizer (grad_reduce.py)
    offload = internal(engine.optimizer, "parameter_offload", needed)
    if policy == GATHERED:
        if not _zero3_params(engine):
            raise DeepSpeedInternalError(f"no parameter carries ds_active_sub_modules, which {needed} needs to "
                                         "find the ZeRO-3 parameters it gathers")
        internal(offload, "_remove_module_hooks", needed)()
        internal(offload, "forward_hooks", needed).clear()
        internal(offload, "backward_hooks", needed).clear()
        _GATHERS[engine] = _gather_of(engine, offload, needed, one_rank_partitions)
    else:
        _release_per_call(offload, engine.module, needed)


def _release_per_call(offload, root, needed: str) -> None:
    """Replace DeepSpeed's per-module post-backward function by one that counts the pending input
    gradients of each *call* (DeepSpeed's hook looks ``module.post_bwd_fn`` up at every call, and
    resets a per-module counter; a pre-hook of ours, run first, opens a fresh count)."""
    release = internal(offload, "post_sub_module_backward_function", needed)
    hooked = [module for module in root.modules() if "post_bwd_fn" in module.__dict__]
    if not hooked:
        raise DeepSpeedInternalError(f"no module carries DeepSpeed's post_bwd_fn, which {needed} replaces to "
                                     "release each pass's parameters after its backward")
    for module in hooked:
        module.register_forward_pre_hook(_open_call, prepend=True)
        module.post_bwd_fn = _release_after_call_backward(release, module)


def _open_call(module, _args) -> None:
    module.pending_input_grads = [0]       # shared by this call's inputs, decremented in backward


def _release_after_call_backward(release, module):
    import torch

    class ReleaseAfterCallBackward(torch.autograd.Function):
        """Identity on one input of one call; the last of the call's input gradients releases."""

        @staticmethod
        def forward(tensor):
            return tensor.detach()

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.pending = module.pending_input_grads
            if inputs[0].requires_grad:
                ctx.pending[0] += 1

        @staticmethod
        def backward(ctx, *grads):
            ctx.pending[0] -= 1
            if ctx.pending[0] == 0:
                release(module)
            return grads

    return ReleaseAfterCallBackward


@contextmanager
def step_gather(engine, policy: str):
    """Around one forward (+ backward): the whole model gathered under ``gathered``, else nothing."""
    if policy != GATHERED:
        yield
        return
    if engine not in _GATHERS:
        raise RuntimeError("step_gather(engine, 'gathered') before apply_gather_policy(engine, 'gathered')")
    with _GATHERS[engine]():
        yield


def _gather_of(engine, offload, needed: str, one_rank_partitions: bool):
    """-> the context that gathers the engine's parameters for a step: DeepSpeed's
    ``GatheredParameters``, or on a partition group of one rank :class:`_PartitionsAsParameters`
    (which then also stands for DeepSpeed's release of every parameter)."""
    import deepspeed
    from deepspeed.runtime.zero import partition_parameters

    params = _zero3_params(engine)
    whole = all(one_rank(internal(p, "ds_process_group", needed))
                and internal(p, "ds_tensor", needed).numel() == internal(p, "ds_numel", needed) for p in params)
    if not (whole and one_rank_partitions):
        return lambda: deepspeed.zero.GatheredParameters(params)
    partitions = _PartitionsAsParameters(params, internal(partition_parameters, "ZeroParamStatus", needed), needed)
    internal(offload, "partition_all_parameters", needed)
    offload.partition_all_parameters = partitions.release_all       # an instance attribute shadows the method
    return partitions.step


class _PartitionsAsParameters:
    """On a partition group of one rank a parameter's partition holds all of it: inside a step each
    parameter's data is its partition in the parameter's shape (no buffer, no copy) and its status
    ``AVAILABLE``; after the step it is released as DeepSpeed releases it (empty data,
    ``NOT_AVAILABLE``; DeepSpeed's persistent parameters stay gathered until its own release before
    the optimizer step, which :meth:`release_all` stands for, and its re-gather after it), so
    checkpoints save and load DeepSpeed's released state."""

    def __init__(self, params: list, status, needed: str):
        self.params, self.status = params, status
        self.persistent = [internal(p, "ds_persist", needed) for p in params]
        check_fields(params, ("ds_shape", "ds_status", "ds_id"), needed)     # read on every step

    @contextmanager
    def step(self):
        for p in self.params:
            self._check_not_inflight(p)
            p.data = p.ds_tensor.data.view(p.ds_shape)
            p.ds_status = self.status.AVAILABLE
        try:
            yield
        finally:
            for p, persistent in zip(self.params, self.persistent):
                if not persistent:
                    self._release(p)

    def release_all(self) -> None:
        """DeepSpeed's ``partition_all_parameters`` (before an optimizer step, around checkpoints):
        every parameter released, over the list made once."""
        for p in self.params:
            self._check_not_inflight(p)
            p.ds_active_sub_modules.clear()
            self._release(p)

    def _release(self, p) -> None:
        """As DeepSpeed's ``free_param``: the data emptied, the status ``NOT_AVAILABLE``."""
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        p.ds_status = self.status.NOT_AVAILABLE

    def _check_not_inflight(self, p) -> None:
        if p.ds_status == self.status.INFLIGHT:
            raise RuntimeError(f"ZeRO-3 parameter {p.ds_id} is being gathered: the gathered policy starts no gather")
