"""Run under torchrun on 2 ranks: DeepSpeed's ``get_grad_norm_direct`` and the foreach norm installed
in its place, on a partition group given as None (the world), each rank holding other gradients.

    torchrun --nproc_per_node 2 -m tests.distributed.grad_norm_world OUT
"""
import os
import sys

import torch


def main(out: str) -> None:
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    from pipeline.engine.grad_norm import install_foreach_grad_norm

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    gradients = [torch.randn(n, generator=generator) for n in (4096, 7, 512)]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in gradients]
    optimizer = Stage3.__new__(Stage3)          # DeepSpeed's own methods, none of its construction
    optimizer.model_parallel_group, optimizer.model_parallel_rank, optimizer.device = None, 0, "cpu"
    optimizer._get_param_partition_group = lambda param: None
    deepspeeds = optimizer.get_grad_norm_direct(gradients, params)
    install_foreach_grad_norm(optimizer, "the test")
    ours = optimizer.get_grad_norm_direct(gradients, params)
    mine_alone = torch.stack([g.double().norm() for g in gradients]).norm()
    if rank == 0:
        torch.save({"deepspeed": deepspeeds, "ours": ours, "rank0_alone": mine_alone}, out)


if __name__ == "__main__":
    from pipeline.engine.distributed import teardown

    main(sys.argv[1])
    teardown()
    sys.stdout.flush()
    os._exit(0)         # as pipeline.train: no finalizers of the process group's C++ objects at exit
