"""``MethodConfig``: the method and every option of it, declared once (``method.*`` in a recipe).

    cfg = MethodConfig("codi", simcot=True, num_latent=6)       # or run.method of a loaded recipe
    get_method(cfg.name).layout(...), LatentReasoner(base, cfg), cfg.n_latents(stage, n_steps)

The run config (pipeline/engine/config.py) reads this class for its ``method`` section, the layouts
and the ``LatentReasoner`` read it directly: adding an option is one field here plus its use. A
``Literal`` field's choices and every rule between the fields are checked once, on construction.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

from .base import get_method, method_names

UNBOUNDED_STEPS = 10**6     # "as many steps as it takes": a count no problem reaches


@dataclass(frozen=True)
class MethodConfig:
    name: str = "cot"                   # cot | nocot | coconut | codi | pause | nothought (pipeline/latent/methods/)
    simcot: bool = False                # the SIM-CoT step decoder on the method's latent slots
    # -- Coconut
    c_thought: int = 2                  # latents per replaced step
    max_latent_stage: int = 3           # stages with their own step; later ones are all-latent
    pad_latent_to_max: bool = True      # false: after the last stage min(steps, max_latent_stage) x c latents
    uniform_prob: float = 0.0           # an example's stage is drawn from 0..its steps with this chance
    progressive_train: bool = False     # c x max_latent_stage latents at every stage, stages only remove steps,
                                        # the decoder reproduces every step (the SIM-CoT authors' LLaMA variant)
    # -- CODI, pause
    num_latent: int = 6                 # latents fed to the model (CODI's SIM-CoT supervises num_latent + 1)
    include_last_step: bool = False     # CODI's teacher keeps the last CoT step (the reference drops it)
    remove_eos: bool = True             # CODI: false = the reference's EOS after the question, CoT and <eot>
    teacher_cot: Literal["joined", "pieces"] = "joined"   # CODI's teacher CoT tokenised as one string (reference)
    step_targets: Literal["spans", "pieces"] = "spans"    # CODI + SIM-CoT: the <<..>> spans of the teacher's CoT
                                        # ids, as the reference finds them | pieces (each step's own ids, separator too)
    projection: bool = True             # CODI's prj; false = the reference's use_prj off (raw hidden states fed)
    prj_dim: int = 0                    # its inner width (0: the hidden size, as every recipe)
    prj_dropout: float = 0.0            # dropout on its input (the reference's prj_dropout)
    prj_layernorm: bool = True          # false: the reference's prj_no_ln
    # -- latent updates (methods that fill latents)
    latent_update: Literal["sequential", "jacobi"] = "sequential"   # jacobi: all latents at once (PCCoT)
    jacobi_iterations: int = 3          # jacobi: parallel passes (= the latent count: the sequential result)
    # -- emulated bugs of CODI's released code, for matching its numbers
    reference_attention: bool = False   # no mask after the question pass (left pads attended), positions = columns
    reference_step_truncation: bool = False  # + simcot: each slot's step targets cut to row 0's width
    reference_quirks: bool = False      # every emulation at once: the two above, and its step scan over the whole
                                        # teacher sequence (remove_eos=false then has no step)
    # -- losses
    decoder_init: Literal["pretrained", "base"] = "pretrained"   # SIM-CoT decoder after checkpoint.init_from:
                                        # the raw pretrained model (the reference) | the checkpoint's base weights
    step_loss_weight: float = 1.0
    step_loss_norm: Literal["token_mean", "sample_sum"] = "token_mean"   # sample_sum: the Coconut reference's
    distill_factor: float = 1.0         # 20 for the LLaMA CODI recipes
    distill_div_std: bool = True
    distill_loss: Literal["smooth_l1", "l2"] = "smooth_l1"   # the reference's distill_loss_type (l2: / std twice)
    teacher_loss_weight: float = 1.0

    def __post_init__(self):
        check_choices(self)
        if self.name not in method_names():
            raise ValueError(f"name {self.name!r}: expected one of {', '.join(method_names())}")
        if self.reference_quirks:           # one switch to compare with the released numbers
            object.__setattr__(self, "reference_attention", True)
            object.__setattr__(self, "reference_step_truncation", self.simcot)
        for ok, message in self._rules():
            if not ok:
                raise ValueError(message)

    def _rules(self) -> list[tuple[bool, str]]:
        """(holds, what to change) for every rule between the fields; messages start with the field."""
        method, name = get_method(self.name), self.name
        slots = " or ".join(n for n in method_names() if get_method(n).supports_simcot)
        codi = method.needs_teacher
        return [
            (not self.simcot or method.supports_simcot,
             f"simcot needs a method with latent slots ({slots}), not {name}"),
            (0 <= self.uniform_prob <= 1, "uniform_prob must be in [0, 1]"),
            (self.uniform_prob == 0 or method.has_curriculum,
             f"uniform_prob draws curriculum stages: a method with a curriculum (coconut), not {name}"),
            (not self.progressive_train or (method.has_curriculum and method.fills_latents),
             f"progressive_train needs a method with a curriculum (coconut), not {name}"),
            (self.step_targets == "spans" or (codi and self.simcot),
             "step_targets=pieces chooses CODI + SIM-CoT's decoder targets: method.name=codi, method.simcot=true"),
            (not self.reference_quirks or codi,
             f"reference_quirks emulates bugs of CODI's released code; {name} has none left to emulate"),
            (not self.reference_quirks or (self.step_targets == "spans" and self.teacher_cot == "joined"),
             "reference_quirks reproduces the reference, whose teacher CoT is joined and whose step targets are "
             "its spans: drop method.step_targets=pieces / method.teacher_cot=pieces"),
            (not self.reference_attention or (codi and self.latent_update == "sequential"),
             "reference_attention emulates CODI's released code: method.name=codi, latent_update=sequential"),
            (not self.reference_step_truncation or (codi and self.simcot),
             "reference_step_truncation emulates CODI's released SIM-CoT code: method.name=codi, method.simcot"),
            (self.remove_eos or codi, f"remove_eos=false is CODI's option (EOS between question, CoT and answer), "
                                      f"not {name}'s"),
            (self.projection or method.needs_projection, f"projection=false turns off CODI's prj; {name} has none"),
            (self.prj_dim >= 0 and 0 <= self.prj_dropout < 1, "prj_dim must be >= 0 and method.prj_dropout in [0, 1)"),
            (self.latent_update == "sequential" or method.fills_latents,
             f"latent_update=jacobi needs a method that fills latents, not {name}"),
            (self.jacobi_iterations >= 0, "jacobi_iterations must be >= 0 (0: the latents stay token embeddings)"),
        ]

    # ------------------------------------------------------------------ what the rest asks of it
    @property
    def jacobi(self) -> int | None:
        """Jacobi iterations of the latent loop (None: sequential filling)."""
        return self.jacobi_iterations if self.latent_update == "jacobi" else None

    def n_latents(self, stage: int, n_steps: int) -> int:
        return get_method(self.name).n_latents(self, stage, n_steps)

    def slot_width(self) -> int:
        return get_method(self.name).slot_width(self)

    def latent_span(self, stage: int) -> int:
        """Latent columns every batch at ``stage`` runs, the most any of its examples can hold, so every
        rank makes the same passes (ZeRO-3 lockstep) whatever its rows hold."""
        if self.uniform_prob > 0:
            return get_method(self.name).max_latents(self)
        return self.stage_latents(stage)

    def stage_latents(self, stage: int) -> int:
        """The latents a problem gets at ``stage`` when it has steps enough (the stage's own count)."""
        return self.n_latents(stage, n_steps=UNBOUNDED_STEPS)

    def replace(self, **changes) -> MethodConfig:
        return dataclasses.replace(self, **changes)


def check_choices(settings) -> None:
    """Every ``Literal`` field of a dataclass holds one of its choices: "field: a, b or c"."""
    for field, kind in typing.get_type_hints(type(settings)).items():
        if typing.get_origin(kind) is Literal and getattr(settings, field) not in typing.get_args(kind):
            choices = [str(c) for c in typing.get_args(kind)]
            raise ValueError(f"{field}: {', '.join(choices[:-1])} or {choices[-1]} "
                             f"(got {getattr(settings, field)!r})")
