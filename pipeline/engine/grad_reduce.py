"""When ZeRO-3 reduce-scatters the gradients: a decision of the memory plan (pipeline/engine/memory_plan.py).

    engine = deepspeed.initialize(...)[0]
    apply_grad_reduce(engine, plan.grad_reduce)     # OVERLAPPED changes nothing

``overlapped`` is DeepSpeed's own way: a hook on every parameter adds its gradient to a bucket as
soon as autograd has it and reduce-scatters a full bucket while backward goes on, so at most a
bucket of full-size gradients is alive beside the partitions. The hook is Python, run once per
parameter per micro-batch: about 45 us on this CPU (P8 in the README), 315 us on an H100 host
(P6: 146 of them cost 46 ms of a 160 ms CoT step).

``after_backward`` (the plan's choice when every trainable parameter's full-size gradient fits
next to the gathered model): no per-parameter hooks; when backward has finished, the gradients
are reduce-scattered and partitioned a bucket at a time, by the very functions DeepSpeed's
epilogue uses for its last bucket (``__avg_scatter_grads``, ``partition_grads``), in the same
order (by parameter id), so the partitions and the optimizer step are bit-identical to
``overlapped`` (tested on one and two ranks). What it gives up is the overlap of the
reduce-scatters with backward, which a latent method barely has anyway: autograd sums a base
parameter's contributions from all passes before its hook can fire, at the very end of backward.
The lockstep rule keeps the collectives matched: every rank runs the same module calls, so every
rank holds gradients for the same parameters.

DeepSpeed 0.19.8's internals are used by name (``_grad_acc_hooks``, the name-mangled
``__avg_scatter_grads``); :func:`apply_grad_reduce` refuses a DeepSpeed without them.
"""
from __future__ import annotations

OVERLAPPED = "overlapped"
AFTER_BACKWARD = "after_backward"
GRAD_REDUCES = (OVERLAPPED, AFTER_BACKWARD)


def apply_grad_reduce(engine, mode: str) -> None:
    """Once, after ``deepspeed.initialize``: under ``after_backward`` replace DeepSpeed's
    per-parameter gradient hooks by one reduction at the end of backward."""
    if mode not in GRAD_REDUCES:
        raise ValueError(f"gradient reduction {mode!r}: expected one of {', '.join(GRAD_REDUCES)}")
    optimizer = engine.optimizer
    if mode == OVERLAPPED:
        return
    scatter = getattr(optimizer, "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads", None)
    if scatter is None or not hasattr(optimizer, "_grad_acc_hooks"):
        raise RuntimeError("train.grad_reduce=after_backward needs ZeRO-3 on DeepSpeed 0.19.x "
                           f"(found {type(optimizer).__name__}); set train.grad_reduce=overlapped")
    if getattr(optimizer, "leaf_parameters", None):
        raise RuntimeError("train.grad_reduce=after_backward does not handle ZeRO-3 leaf modules; "
                           "set train.grad_reduce=overlapped")
    for handle in optimizer._grad_acc_hooks:
        handle.remove()
    optimizer._grad_acc_hooks.clear()
    params = sorted((p for group in optimizer.fp16_groups for p in group if p.requires_grad), key=lambda p: p.ds_id)
    epilogue = optimizer.independent_gradient_partition_epilogue

    def reduce_then_epilogue():
        """DeepSpeed calls this once per backward (engine.backward's epilogue); its own work,
        after ours, finds an empty bucket and builds the averaged gradients for the step."""
        by_comm_dtype: dict = {}        # one dtype unless DeepSpeed's torch autocast is on
        for p in params:
            if p.grad is not None:
                by_comm_dtype.setdefault(optimizer.get_param_comm_dtype(p), []).append(p)
        for comm_dtype, ready in by_comm_dtype.items():
            for bucket in buckets(ready, optimizer.reduce_bucket_size):
                optimizer.partition_grads(bucket, scatter(bucket, comm_dtype))
        epilogue()

    optimizer.independent_gradient_partition_epilogue = reduce_then_epilogue


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
