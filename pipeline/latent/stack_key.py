"""``StackKey``: what a compiled decoder stack's graph depends on besides its input tensors.

    key = StackKey.of(body, project, compiled=True)     # at every call of a compiled stack
    hidden, ... = stack(body, ..., key)                 # the stack reads key.checkpointed
    KeyBudget("lean_stack").admit(key)                  # past the budget: StaleGraphError naming the change

The compiled stacks (pipeline/latent/lean_forward.py) skip dynamo's guards on module attributes:
at small shapes those guards cost more than the layers' arithmetic (benchmark P12). Nothing is
then left to notice that a module changed between two calls (a LoRA scaling, an adapter switched
off, a frozen weight, a layer built unlike the others, the latent projection's dropout or mode),
and the old graph would compute the old model without an error. The key stands in for those
guards: every module of every layer, of the final norm and of the projection, with each of its
settings (the scalars, and containers of scalars, among its attributes besides those every
``nn.Module`` keeps, its parameters, buffers, submodules and hooks: a LoRA layer's
``scaling`` and ``_disable_adapters``, a dropout's ``p``, ``training``, an RMSNorm's epsilon,
a layer's ``gradient_checkpointing``), each parameter's shape, dtype and ``requires_grad``, the
attention heads and kernel, and whether gradients are taken. The graph guards on the key's
``text``, read inside the graph through :attr:`StackKey.checkpointed`, so a changed module is a
new graph. DeepSpeed's own per-module bookkeeping (``ds_*``) is left out: it changes as ZeRO-3
runs and does not enter the arithmetic.

A key is taken at every call, or once per model and projection within :func:`one_forward` (the
reasoner's forward: a model does not change in the middle of one). Each new key compiles anew;
:class:`KeyBudget` bounds how many a stack may meet, so a model changed at every step stops with
the change named instead of compiling at every step.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pipeline.latent.attention import kernel_name

KEY_BUDGET = 8          # structures one compiled stack may meet: base and step decoder, with and without
                        # checkpointing, the projection in training and evaluation
_SCALARS = (bool, int, float, str, type(None))
_LEFT_OUT = object()
_MODULE_OWN = frozenset(vars(torch.nn.Module())) - {"training"}    # parameters, buffers, submodules, hooks


@dataclass(frozen=True)
class StackKey:
    layers: tuple[bool, ...]            # per layer: runs under activation checkpointing
    parts: tuple = ()                   # (where, what) pairs: every module's settings, every parameter
    text: str = ""                      # ``parts``' hash as a string: what a compiled graph guards on

    @classmethod
    def of(cls, body, project=None, compiled: bool = False) -> StackKey:
        """The key of ``body`` (a decoder stack: ``layers``, ``norm``, ``config``) and ``project``
        (the latent projection, a module or None) now; without ``compiled`` the checkpointing alone
        (an eager stack reads nothing else from it)."""
        grad = torch.is_grad_enabled()
        layers = tuple(bool(getattr(layer, "gradient_checkpointing", False) and layer.training and grad)
                       for layer in body.layers)
        if not compiled:
            return cls(layers)
        memo = _FORWARDS[-1] if _FORWARDS else {}
        taken = (id(body), id(project), grad)
        if taken not in memo:
            memo[taken] = cls._taken(body, project, layers, grad)
        return memo[taken]

    @classmethod
    def _taken(cls, body, project, layers: tuple[bool, ...], grad: bool) -> StackKey:
        cfg = body.config
        parts = [("attention", f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}:{kernel_name(cfg)}"),
                 ("grad", grad), ("checkpointed", layers)]
        modules = [(f"layers.{i}", layer) for i, layer in enumerate(body.layers)] + [("norm", body.norm)]
        if isinstance(project, torch.nn.Module):
            modules.append(("project", project))
        for prefix, module in modules:
            parts.extend(_module_parts(prefix, module))
        parts = tuple(parts)
        return cls(layers, parts, f"{hash(parts):x}")

    @property
    def checkpointed(self) -> tuple[bool, ...]:
        """Which layers run under activation checkpointing. A compiled graph guards on what it
        reads: reading ``text`` here makes that the whole key."""
        return self.layers if self.text is not None else ()

    def changes_from(self, other: StackKey) -> list[str]:
        """What differs from ``other``, one "where: before -> now" per part."""
        before, now = dict(other.parts), dict(self.parts)
        return [f"{where}: {before.get(where, 'absent')} -> {now.get(where, 'absent')}"
                for where in sorted(set(before) | set(now)) if before.get(where) != now.get(where)]


def _module_parts(prefix: str, root: torch.nn.Module) -> list[tuple[str, object]]:
    parts = []
    for name, module in root.named_modules(prefix=prefix):
        settings = ((key, _frozen(value)) for key, value in vars(module).items()
                    if key not in _MODULE_OWN and not key.startswith("ds_"))
        parts.append((name, (type(module).__name__, tuple(kv for kv in settings if kv[1] is not _LEFT_OUT))))
        for pname, param in module._parameters.items():
            if param is not None:
                shape = tuple(getattr(param, "ds_shape", param.shape))      # ZeRO-3: the full shape, gathered or not
                parts.append((f"{name}.{pname}", (shape, param.dtype, param.requires_grad)))
    return parts


def _frozen(value):
    """A setting as a hashable constant; ``_LEFT_OUT`` for what is no setting (tensors, the config
    object)."""
    if type(value) in _SCALARS or isinstance(value, (torch.dtype, *_SCALARS)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
        return tuple(value)
    if isinstance(value, (set, frozenset)) and all(isinstance(v, _SCALARS) for v in value):
        return tuple(sorted(value, key=repr))
    if isinstance(value, dict) and all(isinstance(v, _SCALARS) for v in (*value, *value.values())):
        return tuple(sorted(value.items(), key=repr))
    return _LEFT_OUT


_FORWARDS: list[dict] = []      # one memo of keys per open one_forward()


@contextmanager
def one_forward():
    """Within: each stack's key is taken once (per body, projection and grad mode)."""
    _FORWARDS.append({})
    try:
        yield
    finally:
        _FORWARDS.pop()


class StaleGraphError(RuntimeError):
    """A compiled stack met more structures than its budget."""


@dataclass
class KeyBudget:
    """The structures one compiled stack has met, at most ``limit``."""
    name: str
    limit: int = KEY_BUDGET
    seen: list = dataclasses.field(default_factory=list)

    def admit(self, key: StackKey) -> None:
        if any(key.text == known.text for known in self.seen):
            return
        if len(self.seen) >= self.limit:
            nearest = min(self.seen, key=lambda known: len(key.changes_from(known)))
            changes = key.changes_from(nearest)
            raise StaleGraphError(
                f"the compiled {self.name} met a structure beyond its budget of {self.limit}, each one compiled "
                f"anew; {len(changes)} change(s) from the nearest: {'; '.join(changes[:3])}. A model whose modules "
                "change this often runs with model.body_forward=lean")
        self.seen.append(key)
