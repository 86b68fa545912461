"""ZeRO-3's gradient norm in one foreach call: part of ``train.grad_reduce=after_backward``.

    apply_grad_reduce(engine, AFTER_BACKWARD)    # installs it (grad_reduce.py)

DeepSpeed 0.19.8's ``get_grad_norm_direct`` takes the norm of each gradient partition in a Python
loop (two ``.to`` calls and a norm per parameter), then all-reduces the sum of squares over the
partition group even when that group is one rank. Both are a fixed host cost per step, measured in
benchmarks/README.md (P8). This is the same
arithmetic with one ``torch._foreach_norm`` (its ``dtype`` is the norm dtype, as DeepSpeed's
casts are), and no all-reduce on a group of one, where it is the identity. On a CPU the norm is
bit-identical to DeepSpeed's (tested on one and two ranks); on CUDA the foreach kernel sums in
another order: fp32 rounding, as ``torch.nn.utils.clip_grad_norm_`` already does. Anything but
the plain case (another norm type, tensor or expert parallelism, no gradients) is DeepSpeed's
own function, unchanged.
"""
from __future__ import annotations

import torch

from pipeline.engine.deepspeed_internals import internal


def install_foreach_grad_norm(optimizer, needed: str) -> None:
    """Replace ``optimizer.get_grad_norm_direct`` (an instance attribute shadows the method) by
    :func:`foreach_grad_norm`, falling back to DeepSpeed's outside the plain case."""
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.zero.utils import get_norm_dtype

    deepspeeds = internal(optimizer, "get_grad_norm_direct", needed)
    partition_group = internal(optimizer, "_get_param_partition_group", needed)
    expert_group = internal(optimizer, "_autoep_expert_parallel_group", needed)
    tensor_parallel = (internal(optimizer, "model_parallel_group", needed) is not None
                       or internal(optimizer, "model_parallel_rank", needed) != 0)

    def get_grad_norm_direct(gradients, params, norm_type=2):
        if norm_type != 2 or tensor_parallel or not gradients or pg_utils.is_parallel(expert_group(params)):
            return deepspeeds(gradients, params, norm_type)
        group = partition_group(params[0])
        return foreach_grad_norm(gradients, get_norm_dtype(), None if one_rank(group) else group)

    optimizer.get_grad_norm_direct = get_grad_norm_direct


def one_rank(group) -> bool:
    """Whether ``group`` (None: the world, as DeepSpeed's collectives read it) is a single rank, where
    a reduction over it is the identity."""
    import deepspeed.comm as dist

    return dist.get_world_size(group=group) == 1


def foreach_grad_norm(gradients: list, dtype: torch.dtype, summed_over=None) -> torch.Tensor:
    """The 2-norm of all ``gradients`` in ``dtype``, their squares summed over the ranks of the group
    ``summed_over`` (a partition each; None: this rank's alone), or -1 where it is not finite:
    DeepSpeed's mark of a step to skip."""
    import deepspeed.comm as dist

    total = torch.sum(torch.pow(torch.stack(torch._foreach_norm(gradients, 2.0, dtype=dtype)), 2.0))
    if summed_over is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=summed_over)
    total = total ** 0.5
    invalid = total.isnan().logical_or(total.isinf())
    return torch.where(invalid, torch.tensor(-1.0, device=total.device, dtype=torch.float), total)
