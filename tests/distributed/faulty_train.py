"""``pipeline.train`` with faults injected into the real run, for the guard's tests.

    FAULTS='[{"kind": "nan_loss", "step": 5, "rank": 1}]' torchrun ... -m tests.distributed.faulty_train ARGS

Each fault acts on one optimizer step (``step``, 1-based as the trainer counts them; from that step
on for ``collapse``) on one rank (``rank``; absent: every rank):

* ``nan_loss``: the loss times NaN (its gradients NaN too);
* ``nan_detached``: NaN added to the loss as a constant (its gradients stay finite);
* ``inf_grad``: the loss unchanged, its gradient times infinity in backward;
* ``spike``: the loss (and so its gradients) times ``factor``;
* ``collapse``: CODI's projection sends every latent the same direction (its norm kept);
* ``nan_valid``: the validation losses NaN;
* ``nan_weight``: once the step's update is done, one weight of this rank's partition NaN.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

FAULTS = json.loads(os.environ.get("FAULTS", "[]"))
current = {"step": 0}


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _active(kind: str) -> dict | None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    for fault in FAULTS:
        if fault["kind"] != kind or fault.get("rank", rank) != rank:
            continue
        if current["step"] == fault.get("step") or (kind == "collapse" and current["step"] >= fault["step"]):
            return fault
    return None


def install() -> None:
    from pipeline.engine.trainer import Trainer
    from pipeline.latent.reasoner import LatentReasoner, Projection

    micro_step, forward, project = Trainer._micro_step, LatentReasoner.forward, Projection.forward

    def counting_micro_step(self, batch, last):
        current["step"] = self.progress.global_step + 1
        micro_step(self, batch, last)
        if last and _active("nan_weight"):
            weight = next(self.engine.module.parameters())
            with torch.no_grad():
                (weight.ds_tensor if hasattr(weight, "ds_id") else weight).view(-1)[0] = float("nan")

    def faulty_forward(self, batch):
        losses = forward(self, batch)
        total = losses["total"]
        if not self.training:
            if any(f["kind"] == "nan_valid" for f in FAULTS):
                losses["total"] = total * float("nan")
            return losses
        if _active("nan_loss"):
            losses["total"] = total * float("nan")
        elif _active("nan_detached"):
            losses["total"] = total + torch.tensor(float("nan"), dtype=total.dtype)
        elif _active("inf_grad"):
            losses["total"] = _InfGrad.apply(total)
        elif fault := _active("spike"):
            losses["total"] = total * fault["factor"]
        return losses

    def collapsing_project(self, x):
        out = project(self, x)
        if self.training and _active("collapse"):
            direction = torch.ones_like(out) / out.size(-1) ** 0.5
            return out.norm(dim=-1, keepdim=True) * direction
        return out

    Trainer._micro_step, LatentReasoner.forward, Projection.forward = counting_micro_step, faulty_forward, \
        collapsing_project


if __name__ == "__main__":
    install()
    from pipeline.train import main

    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
