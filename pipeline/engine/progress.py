"""Where a run is: everything besides the engine that a resume or a rollback needs.

    checkpoint.save(engine, ckpt_dir, tag, progress.as_dict())      # DeepSpeed client state
    progress = Progress.of(checkpoint.load(engine, ckpt_dir, tag))
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from pipeline.engine.guard import Finding, GuardState


@dataclass
class Progress:
    epoch: int = 0
    micro_in_epoch: int = 0
    global_step: int = 0            # optimizer steps, counted whether they updated the weights or not
    best_valid: float = math.inf
    best_tag: str = ""
    stage: int = 0
    skipped: list = field(default_factory=list)     # steps a rollback left out: their batches are never trained on
    guard: GuardState = field(default_factory=GuardState)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, state: dict) -> Progress:
        """The progress a checkpoint's client state holds (a key a run of older code did not save:
        its default)."""
        kept = {k: state[k] for k in cls().as_dict() if k in state}
        return cls(**{**kept, "guard": GuardState(**kept.get("guard", {}))})

    def rolled_back(self, checkpoint_state: dict, finding: Finding) -> Progress:
        """The progress of a rollback to a checkpoint: the checkpoint's, leaving out the steps it
        left out and the finding's, keeping this run's counts of what the guard found."""
        back = Progress.of(checkpoint_state)
        back.skipped = sorted(set(back.skipped) | set(self.skipped) | set(finding.steps))
        g, now = back.guard, self.guard
        g.bad_total, g.spikes, g.collapses = now.bad_total, now.spikes, now.collapses
        return back


class Rollback(Exception):
    """Raised out of the epoch loop: the guard asks for the last good checkpoint."""

    def __init__(self, finding: Finding):
        super().__init__(finding.message)
        self.finding = finding
