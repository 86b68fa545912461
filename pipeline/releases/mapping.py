"""Every tensor of a release accounted for: mapped onto the project's parts, or dropped with the
reason, and checked against the shapes the base plus the reference's added tokens must have.

    mapped = map_codi(release.state, lora_alpha=32, conv1d=set())   # or map_coconut(release.state, input_key)
    check_shapes(mapped.base, expected_shapes, "the base", optional={"lm_head.weight"})

A release whose tensors do not fit is refused with the tensors and numbers; nothing is skipped in
silence (the reference's ``load_state_dict(strict=False)`` skips what it does not know).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from common.cli import UserError
from pipeline.engine.checkpoint import take

LORA_A = re.compile(r"^(?P<module>.+)\.lora_A\.(?P<adapter>[^.]+)\.weight$")
# Buffers older transformers saved in state dicts: not weights; the model rebuilds them.
REBUILT_BUFFERS = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")


@dataclass
class Mapped:
    base: dict[str, torch.Tensor]                    # the base LM's HF keys, LoRA merged in
    projection: dict[str, torch.Tensor] = field(default_factory=dict)   # CODI's prj as our Projection's keys
    decoder: dict[str, torch.Tensor] = field(default_factory=dict)      # the SIM-CoT step decoder's HF keys
    decoder_in: dict[str, torch.Tensor] = field(default_factory=dict)   # its input map (another width)
    dropped: list[tuple[str, str]] = field(default_factory=list)        # (release key, why)
    lora: dict = field(default_factory=dict)         # rank, alpha, modules merged
    consumed: dict[str, int] = field(default_factory=dict)   # release tensors read into each part

    @property
    def total(self) -> int:
        """The release's tensors: each read into a part or dropped."""
        return sum(self.consumed.values()) + len(self.dropped)

    def accounting(self) -> dict:
        """Where each of the release's tensors went (``import_report.json``)."""
        return {"tensors": self.total, "into": self.consumed,
                "lora_merged": self.lora, "dropped": [{"key": k, "why": why} for k, why in self.dropped]}

    def summary(self) -> str:
        into = ", ".join(f"{n} into the {part}" for part, n in self.consumed.items() if n)
        lora = (f"; LoRA r{self.lora['r']} alpha {self.lora['alpha']} merged into {self.lora['modules']} weights"
                if self.lora else "")
        dropped = "".join(f"\n  dropped {key}: {why}" for key, why in self.dropped)
        return f"{self.total} release tensors: {into}, {len(self.dropped)} dropped{lora}{dropped}"


def map_codi(state: dict, lora_alpha: float, conv1d: set[str]) -> Mapped:
    """The CODI module's state dict (InternLM/SIM-CoT ``CODI/src/model.py``, zhenyi4/codi): ``codi.``
    the PEFT-wrapped base (``codi.`` alone without LoRA), ``prj.1/3/ln`` the projection, ``decoder.``
    the SIM-CoT step decoder, ``pj_in.`` its input map."""
    state = dict(state)
    peft = take(state, "codi.base_model.model.")
    base = peft or take(state, "codi.")
    mapped = Mapped(base={})
    prj = take(state, "prj.")
    renames = {"1.": "0.", "3.": "2.", "ln.": "3."}
    for key, value in prj.items():
        head = next((h for h in renames if key.startswith(h)), None)
        if head is None:
            raise UserError(f"release tensor prj.{key}: not a part of CODI's projection (Dropout, Linear, GELU, "
                            "Linear, LayerNorm); this is not a CODI release, or a variant this importer does not know")
        mapped.projection[renames[head] + key[len(head):]] = value
    mapped.decoder = take(state, "decoder.")
    mapped.decoder_in = take(state, "pj_in.")
    for key in take(state, "pj_out."):
        mapped.dropped.append((f"pj_out.{key}", "the reference's map from a decoder of another vocabulary back to "
                               "the base's; its evaluation never calls it"))
    _refuse_foreign(state)
    _drop_buffers(mapped, base, "codi.base_model.model." if peft else "codi.")
    _drop_buffers(mapped, mapped.decoder, "decoder.")
    mapped.consumed = {"base": len(base), "projection": len(prj), "step decoder": len(mapped.decoder),
                       "decoder input map": len(mapped.decoder_in)}
    mapped.base, mapped.lora = merge_lora(base, lora_alpha, conv1d) if peft else (base, {})
    return mapped


def map_coconut(state: dict, input_key: str) -> Mapped:
    """Coconut's ``torch.save(model.state_dict())`` (facebookresearch/coconut, InternLM/SIM-CoT
    ``Coconut/``): ``base_causallm.`` the base, ``embedding.`` an alias of its input embeddings,
    ``expainable_llm.`` SIM-CoT's step decoder."""
    state = dict(state)
    mapped = Mapped(base=take(state, "base_causallm."))
    alias = take(state, "embedding.")
    for key, value in alias.items():
        if key != "weight" or input_key not in mapped.base or not torch.equal(value, mapped.base[input_key]):
            raise UserError(f"release tensor embedding.{key}: Coconut saves it as the same tensor as "
                            f"base_causallm.{input_key}, but here it differs; the release is not a Coconut model's")
        mapped.dropped.append(("embedding.weight", f"the same tensor as base_causallm.{input_key} (Coconut's alias)"))
    mapped.decoder = take(state, "expainable_llm.")
    _refuse_foreign(state)
    _drop_buffers(mapped, mapped.base, "base_causallm.")
    _drop_buffers(mapped, mapped.decoder, "expainable_llm.")
    mapped.consumed = {"base": len(mapped.base), "step decoder": len(mapped.decoder)}
    return mapped


def merge_lora(weights: dict, alpha: float, conv1d: set[str]) -> tuple[dict, dict]:
    """PEFT's LoRA keys merged: ``M.base_layer.W + alpha / r * B @ A`` -> ``M.W`` (transposed for
    the ``conv1d`` modules, GPT-2's ``Conv1D`` whose weights are stored in x out)."""
    weights, merged, ranks = dict(weights), {}, set()
    for match in [m for m in map(LORA_A.match, list(weights)) if m]:
        key, module, adapter = match.string, match["module"], match["adapter"]
        a, b = weights.pop(key), weights.pop(f"{module}.lora_B.{adapter}.weight", None)
        target = f"{module}.base_layer.weight"
        if b is None or target not in weights:
            raise UserError(f"release tensor {key}: its LoRA pair or base weight is missing "
                            f"({module}.lora_B.{adapter}.weight, {target})")
        ranks.add(a.shape[0])
        delta = (b.float() @ a.float()) * (alpha / a.shape[0])
        base = weights.pop(target)
        delta = delta.t() if module in conv1d else delta
        if delta.shape != base.shape:
            raise UserError(f"release tensor {key}: LoRA update {list(delta.shape)} does not fit {target} "
                            f"{list(base.shape)}")
        merged[f"{module}.weight"] = (base.float() + delta).to(base.dtype)
    for key in [k for k in weights if ".base_layer." in k]:
        merged[key.replace(".base_layer.", ".")] = weights.pop(key)
    leftover = [k for k in weights if ".lora_" in k]
    if leftover:
        raise UserError(f"release tensors {leftover[:3]}: LoRA parts without their pair (a DoRA or another "
                        "adapter kind this importer does not merge)")
    if len(ranks) > 1:
        raise UserError(f"the release's LoRA modules have ranks {sorted(ranks)}; the reference uses one rank")
    lora = {"r": ranks.pop(), "alpha": alpha, "modules": len(merged)} if ranks else {}
    merged.update(weights)
    return merged, lora


def check_shapes(got: dict, expected: dict[str, torch.Size], part: str, optional: set[str] = frozenset()) -> None:
    """Every expected tensor present with its shape (those ``optional`` may be absent: a tied LM
    head), none more: else refused with the numbers."""
    missing = sorted(set(expected) - set(got) - set(optional))
    foreign = sorted(set(got) - set(expected))
    wrong = [f"{k}: the release has {list(got[k].shape)}, {part} needs {list(expected[k])}"
             for k in sorted(set(got) & set(expected)) if got[k].shape != expected[k]]
    more = " ..." if len(missing) > 5 else ""
    problems = [f"missing {', '.join(missing[:5])}{more} ({len(missing)})"] if missing else []
    problems += [f"not part of {part}: {', '.join(foreign[:5])}"] if foreign else []
    problems += wrong[:5]
    if problems:
        raise UserError(f"the release does not fit {part}: " + "; ".join(problems))


def _drop_buffers(mapped: Mapped, weights: dict, prefix: str) -> None:
    for key in [k for k in weights if REBUILT_BUFFERS.search(k)]:
        weights.pop(key)
        mapped.dropped.append((prefix + key, "a buffer older transformers saved (rebuilt by the model, not a weight)"))


def _refuse_foreign(state: dict) -> None:
    if state:
        keys = sorted(state)
        raise UserError(f"release tensors that belong to no part this importer knows: {', '.join(keys[:5])}"
                        f"{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}; check --format")
