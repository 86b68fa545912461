"""Every DeepSpeed internal this pipeline uses, behind one guard.

    check_version(run.train.deepspeed_check)             # once, before a patch is applied
    offload = internal(engine.optimizer, "parameter_offload", "train.zero3_gather=gathered")

The gather policies (gather_policy.py) and the gradient reduction after backward (grad_reduce.py)
reach into DeepSpeed's ZeRO-3 objects by name: attributes no public API offers. The names are
those of the versions in ``TESTED_VERSIONS`` (the tests run every patch on them); another version
is refused at start-up unless ``train.deepspeed_check=warn``, and a name that is missing is
refused, naming it and the setting that avoids it, never skipped in silence: an attribute with
:func:`internal`, a function of a DeepSpeed module with :func:`internal_of`, and the per-parameter
fields a patch reads on every step with :func:`check_fields`, once, when the patch is installed.
"""
from __future__ import annotations

from typing import Literal

TESTED_VERSIONS = ("0.19.8",)
ENFORCE, WARN = "enforce", "warn"
Check = Literal["enforce", "warn"]


class DeepSpeedInternalError(RuntimeError):
    """The installed DeepSpeed lacks an internal a patch needs (or is an untested version)."""


def installed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def check_version(check: Check = ENFORCE) -> None:
    """Refuse (``enforce``) or warn about (``warn``) a DeepSpeed the patches were not tested on."""
    version = installed_version()
    if version in TESTED_VERSIONS:
        return
    message = (f"DeepSpeed {version} is not a version this pipeline's ZeRO-3 patches are tested on "
               f"({', '.join(TESTED_VERSIONS)}): pip install deepspeed=={TESTED_VERSIONS[-1]}, or set "
               f"train.deepspeed_check=warn to run them untested")
    if check == ENFORCE:
        raise DeepSpeedInternalError(message)
    print(f"warning: {message}", flush=True)


def internal_of(module: str, name: str, needed_by: str):
    """A function or class of a DeepSpeed module (``deepspeed.comm.pg_utils``), or a refusal as
    :func:`internal`'s when the module or the name is missing."""
    import importlib

    try:
        found = importlib.import_module(module)
    except ImportError:
        raise DeepSpeedInternalError(f"DeepSpeed {installed_version()} has no module {module}, which {needed_by} "
                                     f"needs (written for DeepSpeed {', '.join(TESTED_VERSIONS)})") from None
    return internal(found, name, needed_by)


def check_fields(params, names: tuple[str, ...], needed_by: str) -> None:
    """Refuse, through :func:`internal`, parameters lacking a per-parameter field a patch reads on
    every step (where it then reads it directly)."""
    for p in params:
        for name in names:
            internal(p, name, needed_by)


def internal(obj, name: str, needed_by: str):
    """``getattr(obj, name)``, or a refusal naming the attribute, the DeepSpeed version, what needs
    it (a setting, with the one that does without it)."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise DeepSpeedInternalError(
            f"DeepSpeed {installed_version()} has no {type(obj).__name__}.{name}, which {needed_by} needs "
            f"(written for DeepSpeed {', '.join(TESTED_VERSIONS)})") from None
