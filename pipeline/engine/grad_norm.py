"""ZeRO-3's gradient norm in one foreach call: part of ``train.grad_reduce=after_backward``.

    apply_grad_reduce(engine, AFTER_BACKWARD)    # installs it (grad_reduce.py)

DeepSpeed's ``get_grad_norm_direct`` takes the norm of each gradient partition in a Python loop
(two ``.to`` calls and a norm per parameter), then all-reduces the sum of squares over the
partition group even when that group is one rank: a fixed host cost per step (benchmarks/README.md,
P8). This is the same arithmetic with one ``torch._foreach_norm`` (its ``dtype`` is the norm
dtype, as DeepSpeed's casts are), over the same group read the same way (None is the world), and
no all-reduce on a group of one rank, where it is the identity. On a CPU the norm is bit-identical
to DeepSpeed's (tested on one rank and two, the group given and given as None); on CUDA the
foreach kernel sums in another order: fp32 rounding, as ``torch.nn.utils.clip_grad_norm_`` already
does. Anything but the plain case (another norm type, tensor or expert parallelism, no gradients)
is DeepSpeed's own function, unchanged.
"""
from __future__ import annotations

import torch

from pipeline.engine.deepspeed_internals import internal, internal_of


def install_foreach_grad_norm(optimizer, needed: str) -> None:
    """Replace ``optimizer.get_grad_norm_direct`` (an instance attribute shadows the method) by
    :func:`foreach_grad_norm`, falling back to DeepSpeed's outside the plain case."""
    is_parallel = internal_of("deepspeed.comm.pg_utils", "is_parallel", needed)
    norm_dtype = internal_of("deepspeed.runtime.zero.utils", "get_norm_dtype", needed)
    deepspeeds = internal(optimizer, "get_grad_norm_direct", needed)
    partition_group = internal(optimizer, "_get_param_partition_group", needed)
    expert_group = internal(optimizer, "_autoep_expert_parallel_group", needed)
    tensor_parallel = (internal(optimizer, "model_parallel_group", needed) is not None
                       or internal(optimizer, "model_parallel_rank", needed) != 0)

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if norm_type != 2 or tensor_parallel or not gradients or is_parallel(expert_group(params)):
            return deepspeeds(gradients, params, norm_type)
        return foreach_grad_norm(gradients, norm_dtype(), partition_group(params[0]))

    optimizer.get_grad_norm_direct = get_grad_norm_direct


def one_rank(group) -> bool:
    """Whether ``group`` is a single rank, where a reduction over it is the identity. None is the
    world, as DeepSpeed's collectives read it (a process without a process group is a world of one)."""
    import deepspeed.comm as dist
    import torch.distributed

    if group is None and not torch.distributed.is_initialized():
        return True
    return dist.get_world_size(group=group) == 1


def foreach_grad_norm(gradients: list, dtype: torch.dtype, group) -> torch.Tensor:
    """The 2-norm of all ``gradients`` in ``dtype``, their squares summed over the ranks of ``group``
    (each holds a partition; None: the world, as for :func:`one_rank`), or -1 where it is not
    finite: DeepSpeed's mark of a step to skip. No collective where the group is one rank."""
    import deepspeed.comm as dist

    total = torch.sum(torch.pow(torch.stack(torch._foreach_norm(gradients, 2.0, dtype=dtype)), 2.0))
    if not one_rank(group):
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    total = total ** 0.5
    invalid = total.isnan().logical_or(total.isinf())
    return torch.where(invalid, torch.tensor(-1.0, device=total.device, dtype=torch.float), total)
