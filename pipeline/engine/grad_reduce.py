"""When ZeRO-3 reduce-scatters the gradients: a decision of the memory plan (pipeline/engine/memory_plan.py).

    engine = deepspeed.initialize(...)[0]
    apply_grad_reduce(engine, plan.grad_reduce)     # OVERLAPPED changes nothing

``overlapped`` is DeepSpeed's own way: a hook on every parameter adds its gradient to a bucket as
soon as autograd has it and reduce-scatters a full bucket while backward goes on, so at most a
bucket of full-size gradients is alive beside the partitions. The hook is Python, run once per
parameter per micro-batch: a fixed host cost per step that grows with the parameter count
(measured in the benchmarks, P6 and P8).

``after_backward`` (the plan's choice when every trainable parameter's full-size gradient fits
next to the gathered model): no per-parameter hooks; when backward has finished, the gradients
are reduce-scattered and partitioned a bucket at a time, by the very functions DeepSpeed's
epilogue uses for its last bucket (``__avg_scatter_grads``, ``partition_grads``), in the same
order (by parameter id), so the partitions are bit-identical to ``overlapped``'s, and so are the
optimizer steps on a CPU (tested on one and two ranks; on CUDA see the norm below). What it
gives up is the overlap of the reduce-scatters with backward, which a latent method barely has
anyway: autograd sums a base parameter's contributions from all passes before its hook can fire,
at the very end of backward.
The lockstep rule keeps the collectives matched: every rank runs the same module calls, so every
rank holds gradients for the same parameters.

On a partition group of one rank (one GPU, or one CPU process) the reduce-scatter is the identity,
but DeepSpeed 0.19.8 still copies every gradient of a bucket into a new flat buffer, divides it by
one and runs the collective: a fixed host cost per step (benchmarks/README.md, P8), and a second
copy of the bucket's gradients in memory. ``after_backward`` runs DeepSpeed's own ``__avg_scatter_grads``
(its casts and scalings) with only that collective replaced by the identity, while it reduces;
DeepSpeed's hooks (``overlapped``) never see the replacement. On the first micro-batch, where the
communication dtype is the parameters', the whole reduction is then a cast copy of each gradient
into its slot of the partitions, done as one ``_foreach_copy_`` (:class:`_OneRankCopy`). It also
takes the gradient norm in one foreach call (grad_norm.py): bit-identical to DeepSpeed's on a CPU,
fp32 rounding of it on CUDA.

Which of DeepSpeed's reduction paths it stands for: DeepSpeed's bucket flush
(``__reduce_and_partition_ipg_grads``) reduce-scatters the bucket's gradients
(``__avg_scatter_grads``) unless ``contiguous_gradients`` is on, the bucket fits and
``zero_optimization.reduce_scatter`` is off, where it all-reduces the contiguous buffer instead
(``__avg_scatter_contiguous_grads``). ``after_backward`` reproduces the reduce-scatter path: the
default (``reduce_scatter`` on, as every recipe runs) and any bucket too large for the buffer.
It is refused where DeepSpeed would take another path: ``reduce_scatter: false``, ZeRO++'s
quantized all-to-all, ZenFlow, Muon, AutoEP's tensor-parallel folding, and ZeRO-3 leaf modules.
Every DeepSpeed internal it uses is named through ``deepspeed_internals.internal``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from pipeline.engine.deepspeed_internals import (
    ENFORCE,
    Check,
    DeepSpeedInternalError,
    check_fields,
    check_version,
    internal,
)
from pipeline.engine.grad_norm import install_foreach_grad_norm, one_rank

PARAMETER_FIELDS = ("ds_id", "ds_numel")     # DeepSpeed's per-parameter fields read on every step
OVERLAPPED = "overlapped"
AFTER_BACKWARD = "after_backward"
GRAD_REDUCES = (OVERLAPPED, AFTER_BACKWARD)


def apply_grad_reduce(engine, mode: str, check: Check = ENFORCE) -> None:
    """Once, after ``deepspeed.initialize``: under ``after_backward`` replace DeepSpeed's
    per-parameter gradient hooks by one reduction at the end of backward. ``check``: what an
    untested DeepSpeed version gets (``train.deepspeed_check``)."""
    if mode not in GRAD_REDUCES:
        raise ValueError(f"gradient reduction {mode!r}: expected one of {', '.join(GRAD_REDUCES)}")
    if mode == OVERLAPPED:
        return
    check_version(check)
    optimizer = engine.optimizer
    needed = "train.grad_reduce=after_backward (set train.grad_reduce=overlapped)"
    scatter = internal(optimizer, "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads", needed)
    _refuse_other_reduction_paths(optimizer, needed)
    hooks = internal(optimizer, "_grad_acc_hooks", needed)
    partition, comm_dtype = internal(optimizer, "partition_grads", needed), internal(optimizer,
                                                                                      "get_param_comm_dtype", needed)
    epilogue, bucket_size = (internal(optimizer, "independent_gradient_partition_epilogue", needed),
                             internal(optimizer, "reduce_bucket_size", needed))
    params = [p for group in internal(optimizer, "fp16_groups", needed) for p in group if p.requires_grad]
    check_fields(params, PARAMETER_FIELDS, needed)
    params.sort(key=lambda p: p.ds_id)
    identity_on_one_rank = _one_rank_identity(needed)
    copy_on_one_rank = _OneRankCopy(optimizer, params, needed)
    install_foreach_grad_norm(optimizer, needed)
    for handle in hooks:
        handle.remove()
    hooks.clear()

    def reduce_then_epilogue():
        """DeepSpeed calls this once per backward (engine.backward's epilogue); its own work,
        after ours, finds an empty bucket and builds the averaged gradients for the step."""
        by_comm_dtype: dict = {}        # one dtype unless DeepSpeed's torch autocast is on
        for p in params:
            if p.grad is not None:
                by_comm_dtype.setdefault(comm_dtype(p), []).append(p)
        with identity_on_one_rank():
            for dtype, ready in by_comm_dtype.items():
                if copy_on_one_rank.applies(dtype):
                    copy_on_one_rank(ready)
                    continue
                for bucket in buckets(ready, bucket_size):
                    partition(bucket, scatter(bucket, dtype))
        epilogue()

    optimizer.independent_gradient_partition_epilogue = reduce_then_epilogue


def _one_rank_identity(needed: str):
    """A context in which ``__avg_scatter_grads``' reduce-scatter returns its input, flattened, on
    a group of one rank (DeepSpeed's pre-division by one and the collective are exact identities);
    any larger group gets DeepSpeed's collective."""
    from deepspeed.runtime.zero import stage3

    collective = internal(stage3, "reduce_scatter_coalesced", needed)

    def reduce_scatter_coalesced(tensors: list, group=None) -> list:
        if one_rank(group):
            return [tensor.view(-1) for tensor in tensors]
        return collective(tensors, group)

    @contextmanager
    def identity_on_one_rank():
        stage3.reduce_scatter_coalesced = reduce_scatter_coalesced
        try:
            yield
        finally:
            stage3.reduce_scatter_coalesced = collective
    return identity_on_one_rank


class _OneRankCopy:
    """On a partition group of one rank, the first micro-batch's reduction is a copy: DeepSpeed's
    ``__avg_scatter_grads`` and ``partition_grads`` then come to each full gradient cast into its
    slot of the gradient partitions (the reduce-scatter the identity, no scaling: no pre-division,
    no expert averaging), but per parameter in Python. Here it is one ``_foreach_copy_`` (the same
    casts, so the same bits), where the communication dtype is the parameters'; accumulation into
    the partitions (a later micro-batch), an offloaded optimizer, any other dtype or a larger group
    go through DeepSpeed's own functions."""

    SLOTS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"     # ds_id -> its gradient partition

    def __init__(self, optimizer, params: list, needed: str):
        self.optimizer = optimizer
        for name in (self.SLOTS, "micro_step_id", "offload_optimizer", "_offload_boundary_param_ids"):
            internal(optimizer, name, needed)
        group = internal(optimizer, "_get_param_partition_group", needed)
        experts = internal(optimizer, "_autoep_expert_parallel_group", needed)
        self.dtype = internal(optimizer, "dtype", needed)
        self.enabled = bool(params) and all(one_rank(group(p)) for p in params) and experts(params) is None

    def applies(self, comm_dtype) -> bool:
        o = self.optimizer
        return self.enabled and comm_dtype == self.dtype and o.micro_step_id == 0 and not o.offload_optimizer

    def __call__(self, params: list) -> None:
        from deepspeed.accelerator import get_accelerator

        slots = getattr(self.optimizer, self.SLOTS)
        torch._foreach_copy_([slots[p.ds_id].narrow(0, 0, p.ds_numel) for p in params],
                             [p.grad.view(-1) for p in params])
        self.optimizer._offload_boundary_param_ids.update(p.ds_id for p in params)
        accelerator = get_accelerator()
        stream = None if accelerator.is_synchronized_device() else accelerator.current_stream()
        for p in params:
            if stream is not None:      # as partition_grads: the gradient may still be read by the copy's stream
                p.grad.record_stream(stream)
            p.grad = None


# the optimizer's switches for the reduction paths after_backward does not reproduce: (attribute,
# the value that keeps DeepSpeed on the reduce-scatter path, what the other value is)
OTHER_PATHS = (("reduce_scatter", True, "zero_optimization.reduce_scatter=false (contiguous all-reduce)"),
               ("all2all_process_group", None, "ZeRO++ quantized gradients (all-to-all)"),
               ("zenflow", False, "ZenFlow"), ("use_muon", False, "the Muon optimizer"),
               ("autoep_folding_tp_group", None, "AutoEP tensor-parallel folding"))


def _refuse_other_reduction_paths(optimizer, needed: str) -> None:
    for name, expected, what in OTHER_PATHS:
        if internal(optimizer, name, needed) != expected:
            raise DeepSpeedInternalError(f"{needed.split(' (')[0]} reproduces DeepSpeed's reduce-scatter path, "
                                         f"not {what}'s; set train.grad_reduce=overlapped")
    if internal(optimizer, "leaf_parameters", needed):
        raise DeepSpeedInternalError("train.grad_reduce=after_backward does not handle ZeRO-3 leaf modules; "
                                     "set train.grad_reduce=overlapped")


def buckets(params: list, size: int) -> list[list]:
    """Consecutive runs of ``params`` of at most ``size`` elements (a larger parameter alone):
    the reduce-scatter's flat buffer never holds more than a bucket, as under ``overlapped``."""
    out, current, elements = [], [], 0
    for p in params:
        if current and elements + p.ds_numel > size:
            out.append(current)
            current, elements = [], 0
        current.append(p)
        elements += p.ds_numel
    return out + ([current] if current else [])
