"""Each installed flash kernel against SDPA in bf16 on a few-layer LLaMA-3.2-1B-shaped model (hidden
2048, 32 query / 8 key-value heads, MLP 8192): a training step of CoT, Coconut + SIM-CoT and CODI +
SIM-CoT on the lean stack gives SDPA's losses (bf16 tolerance) and close gradients, and greedy
generation gives SDPA's tokens but where the two kernels' top logits tie in bf16 (counted).
Skipped without CUDA or without a flash kernel (requirements-gpu.txt)."""
from __future__ import annotations

import random

import pytest
import torch

from pipeline.inference.generate import latent_generate, left_pad_prompts, prefill
from pipeline.latent.attention import flash_kernels
from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import MethodConfig, get_method, layout
from pipeline.latent.reasoner import LatentReasoner
from tests.toy_records import SPECIAL as SP

pytestmark = pytest.mark.gpu
VOCAB, LAYERS = 1024, 2
METHODS = {
    "cot": (MethodConfig("cot"), 0),
    "coconut+simcot": (MethodConfig("coconut", c_thought=2, max_latent_stage=3, simcot=True), 3),
    "codi+simcot": (MethodConfig("codi", num_latent=6, simcot=True), 0),
}


def _kernels() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [name for name, ok in flash_kernels(on_cuda=True).items() if ok]


def _lm(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=LAYERS,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()


def _records(n: int = 8, seed: int = 0) -> list[dict]:
    """GSM8k-Aug-shaped problems: questions of 20-40 tokens, 3-4 steps of 6-10 tokens."""
    rng = random.Random(seed)
    word = lambda: rng.randrange(100, VOCAB)  # noqa: E731
    records = []
    for _ in range(n):
        steps = [[SP["step_open"]] + [word() for _ in range(rng.randint(4, 8))] + [SP["step_close"], 85]
                 for _ in range(rng.randint(3, 4))]
        records.append({"question_ids": [1] + [word() for _ in range(rng.randint(20, 40))], "step_ids": steps,
                        "answer_ids": [60, 61, word()], "teacher_cot_ids": sum(steps[:-1], []),
                        "cot_ids": sum(steps, [])})
    return records


def _set_kernel(model: LatentReasoner, kernel: str) -> None:
    for lm in (model.base, model.step_decoder):
        if lm is not None:
            lm.set_attn_implementation(kernel)      # transformers' own switch: it loads the flash kernel


def _step(model: LatentReasoner, batch) -> tuple[dict, dict]:
    model.zero_grad(set_to_none=True)
    losses = model(batch)
    losses["total"].backward()
    return ({k: v.item() for k, v in losses.items()},
            {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kernel", _kernels() or ["none"])
def test_a_flash_kernel_trains_as_sdpa_does_in_bf16(kernel, method):
    if kernel == "none":
        pytest.skip("no CUDA device or no flash attention installed (pip install -r requirements-gpu.txt)")
    cfg, stage = METHODS[method]
    model = LatentReasoner(_lm(0), cfg, eos_id=SP["eos"], step_decoder=_lm(1) if cfg.simcot else None,
                           body_forward="lean")
    if model.projection is not None:
        model.projection.to("cuda", torch.bfloat16)
    batch = collate_aligned([layout(r, SP, cfg, stage, [60, 61]) for r in _records()], SP["latent"],
                            SP["pad"]).to("cuda")
    want_losses, want_grads = _step(model, batch)
    _set_kernel(model, kernel)
    losses, grads = _step(model, batch)
    for key, value in want_losses.items():
        assert losses[key] == pytest.approx(value, rel=3e-2, abs=1e-2), key
    for name, want in want_grads.items():
        got = grads[name]
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
        assert cosine > 0.98 or want.norm() < 1e-6, (name, cosine)


def _tie(model, prompt: list[int], ours: list[int], theirs: list[int], project) -> bool:
    """At the first token where the two runs part, SDPA's logits of both choices are within bf16's
    rounding of each other (a tie either kernel may break its way)."""
    at = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    ids, mask = left_pad_prompts([prompt + ours[:at]], pad_id=SP["pad"])
    logits = prefill(model, ids.cuda(), mask.cuda(), SP["latent"], project)[0][0].float()
    return (logits[ours[at]] - logits[theirs[at]]).abs().item() <= 2 ** -7 * logits.abs().max().item()


@pytest.mark.parametrize("kernel", _kernels() or ["none"])
def test_a_flash_kernel_generates_sdpas_tokens_but_for_bf16_ties(kernel):
    if kernel == "none":
        pytest.skip("no CUDA device or no flash attention installed (pip install -r requirements-gpu.txt)")
    cfg = METHODS["codi+simcot"][0]
    model = LatentReasoner(_lm(0), cfg, eos_id=SP["eos"], body_forward="lean").eval()
    project = model.projection.to("cuda", torch.bfloat16)
    prompts = [get_method("codi").prompt(cfg, r["question_ids"], SP, cfg.num_latent) for r in _records(16, seed=1)]
    run = lambda: latent_generate(model.base, prompts, SP["latent"], eos_id=-1, max_new_tokens=16,  # noqa: E731
                                  project=project)
    want = run()
    _set_kernel(model, kernel)
    got = run()
    _set_kernel(model, "sdpa")
    differing = [i for i in range(len(prompts)) if got[i] != want[i]]
    ties = [i for i in differing if _tie(model.base, prompts[i], want[i], got[i], project)]
    print(f"{kernel}: {len(prompts) - len(differing)} of {len(prompts)} prompts decode SDPA's tokens, "
          f"{len(ties)} part at a bf16 tie")
    assert ties == differing and len(differing) <= len(prompts) // 4
