"""What the trainer watches after every optimizer step, and what it does about it.

    guard = NumericGuard(run.train, GuardState())
    for finding in guard.after_step(StepFacts(step, stage, loss, grad_norm, applied, metrics)):
        ...   # log it; finding.action says: skipped, warn, stop or rollback

* **Bad steps**: a step whose loss (summed over micro-batches and ranks) or global gradient norm is
  not finite updates nothing. DeepSpeed discards a step whose gradient norm is not finite, on every
  rank alike (the norm is all-reduced over the data-parallel group first), for fp32 and bf16, ZeRO-1
  to 3; a loss that is not finite while its gradients are (a term that reaches no gradient) is
  turned into one by :func:`keep_or_poison`. ``train.max_bad_steps`` of them in a row -> ``on_bad``.
* **Spikes**: a finite loss above ``spike_factor`` times its running mean (the mean of the first
  ``spike_window`` steps of a curriculum stage, then an exponential mean over about that many).
* **Latent collapse**: on the logged steps, the latents' mean pairwise cosine above
  ``collapse_cosine`` or their norm ratio to the token embeddings outside ``collapse_norm_ratio``,
  ``collapse_patience`` logged steps in a row.

Every decision is a function of values all ranks share (all-reduced losses, DeepSpeed's norm), so
every rank decides alike and no collective is added to a step (the weights check before a
checkpoint is one all-reduce).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from common.cli import UserError

SKIPPED, WARN, STOP, ROLLBACK = "skipped", "warn", "stop", "rollback"
COSINE, NORM_RATIO = "latent/latent_cosine", "latent/latent_norm_ratio"


def keep_or_poison(summed_total: torch.Tensor) -> torch.Tensor:
    """1.0 where the step's total loss (summed over ranks) is finite, else NaN: the last
    micro-batch's loss is multiplied by it before backward, so a loss that is not finite on any
    rank always leaves non-finite gradients, which DeepSpeed then skips on every rank. Times 1.0
    is exact: a finite step's gradients are unchanged, bit for bit. No host sync."""
    return 1.0 + 0.0 * summed_total


def check_deepspeed_skips(ds_config: dict, where: str) -> None:
    """Refuse a DeepSpeed configuration under which a step with non-finite gradients would be
    applied (ZeRO-1/2 check the norm only when it is computed, and bf16 only when asked to)."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("compute_grad_norm") is False:
        raise UserError(f"{where}: zero_optimization.compute_grad_norm=false lets DeepSpeed apply steps whose "
                        "gradients are not finite; remove it (the trainer skips those steps)")
    if ds_config.get("bf16", {}).get("check_grad_overflow") is False:
        raise UserError(f"{where}: bf16.check_grad_overflow=false lets DeepSpeed apply steps whose gradients are "
                        "not finite; remove it (the trainer skips those steps)")


def weights_finite(module, device: torch.device) -> bool:
    """Whether every rank's weights are all finite (each checks its own: its partitions under ZeRO-3,
    else the weights; then one all-reduce)."""
    import torch.distributed as dist

    from pipeline.engine.deepspeed_internals import internal

    local = [internal(p, "ds_tensor", "the finite-weights check before a checkpoint") if hasattr(p, "ds_id")
             else p.data for p in module.parameters()]
    local = [t for t in local if t.numel()]
    finite = not local or bool(torch.isfinite(torch.stack(torch._foreach_norm(local, float("inf")))).all())
    flag = torch.tensor([float(finite)], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@dataclass
class GuardState:
    """What the guard carries from step to step (saved with every checkpoint)."""
    bad_streak: list = field(default_factory=list)     # the current run of bad steps
    bad_total: int = 0
    spikes: int = 0
    collapse_streak: int = 0
    collapses: int = 0
    loss_mean: float = 0.0
    loss_seen: int = 0
    loss_stage: int = -1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class StepFacts(NamedTuple):
    """One optimizer step as every rank saw it."""
    step: int
    stage: int
    loss: float                 # mean total loss over micro-batches and ranks
    grad_norm: float | None     # DeepSpeed's global norm (inf on a step it discarded)
    applied: bool               # whether the weights were updated
    metrics: dict               # the step's metrics (latent geometry on the logged steps)


class Finding(NamedTuple):
    kind: str                   # bad_step, spike, collapse, bad_validation, bad_weights
    step: int
    action: str                 # skipped, warn, stop, rollback
    message: str
    count: int                  # findings of this kind so far (bad_validation, bad_weights: with bad_step's)
    steps: tuple = ()           # the steps whose batches a rollback skips
    figures: dict = {}


class NumericGuard:
    def __init__(self, settings, state: GuardState):
        self.t, self.state = settings, state

    def after_step(self, facts: StepFacts) -> list[Finding]:
        if not facts.applied or not math.isfinite(facts.loss):
            return [self._bad(facts)]
        self.state.bad_streak = []
        return [f for f in (self._spike(facts), self._collapse(facts)) if f is not None]

    def _bad(self, f: StepFacts) -> Finding:
        s, t = self.state, self.t
        s.bad_streak.append(f.step)
        s.bad_total += 1
        why = (f"loss {f.loss}" if not math.isfinite(f.loss) else f"gradient norm {f.grad_norm}") + " is not finite"
        action = t.on_bad if len(s.bad_streak) >= t.max_bad_steps else SKIPPED
        message = (f"step {f.step} (stage {f.stage}): {why}; no weight updated ({len(s.bad_streak)} in a row, "
                   f"train.max_bad_steps={t.max_bad_steps}; {s.bad_total} in all)")
        return Finding("bad_step", f.step, action, message, s.bad_total, tuple(s.bad_streak),
                       {"loss": f.loss, "grad_norm": f.grad_norm, "in_a_row": len(s.bad_streak), "total": s.bad_total})

    def _spike(self, f: StepFacts) -> Finding | None:
        s, t = self.state, self.t
        if not t.spike_factor:
            return None
        if f.stage != s.loss_stage:             # a new curriculum stage has losses of its own
            s.loss_mean, s.loss_seen, s.loss_stage = 0.0, 0, f.stage
        if s.loss_seen >= t.spike_window and f.loss > t.spike_factor * s.loss_mean:
            s.spikes += 1                       # left out of the mean it is measured against
            return Finding("spike", f.step, t.on_spike,
                           f"step {f.step} (stage {f.stage}): loss {f.loss:.4g} is {f.loss / s.loss_mean:.1f}x its "
                           f"running mean {s.loss_mean:.4g} (train.spike_factor={t.spike_factor}; {s.spikes} in all)",
                           s.spikes, (f.step,), {"loss": f.loss, "running_mean": s.loss_mean, "total": s.spikes})
        s.loss_seen += 1
        weight = 1 / s.loss_seen if s.loss_seen <= t.spike_window else 2 / (t.spike_window + 1)
        s.loss_mean += weight * (f.loss - s.loss_mean)
        return None

    def _collapse(self, f: StepFacts) -> Finding | None:
        s, t = self.state, self.t
        cosine, ratio = f.metrics.get(COSINE), f.metrics.get(NORM_RATIO)
        if cosine is None:                      # not a logged step, or no latents
            return None
        band = t.collapse_norm_ratio
        signs = ([f"mean pairwise cosine {cosine:.4f} > {t.collapse_cosine} (train.collapse_cosine)"]
                 if t.collapse_cosine and cosine > t.collapse_cosine else [])
        if band and not band[0] <= ratio <= band[1]:
            signs.append(f"latent/token norm ratio {ratio:.4g} outside {list(band)} (train.collapse_norm_ratio)")
        s.collapse_streak = s.collapse_streak + 1 if signs else 0
        if not signs or s.collapse_streak % t.collapse_patience:
            return None
        s.collapses += 1
        return Finding("collapse", f.step, t.on_collapse,
                       f"step {f.step} (stage {f.stage}): latent collapse: {'; '.join(signs)} for "
                       f"{s.collapse_streak} logged steps in a row (train.collapse_patience={t.collapse_patience})",
                       s.collapses,
                       figures={"latent_cosine": cosine, "latent_norm_ratio": ratio, "in_a_row": s.collapse_streak})

    def not_finite(self, kind: str, step: int, what: str) -> Finding:
        """A validation loss or weights that are not finite: no checkpoint is written."""
        self.state.bad_total += 1
        return Finding(kind, step, self.t.on_bad, f"step {step}: {what} is not finite; checkpoint not written",
                       self.state.bad_total)
