"""The kernel ``model.attn_implementation`` names is the one every pass calls: a kernel registered under
a new name through transformers' ``AttentionInterface`` (computing SDPA, recording the pass that
called it) is reached by every kind of pass of a training step (CoT, Coconut + SIM-CoT, CODI +
SIM-CoT, Jacobi CODI + SIM-CoT; per-layer checkpointing on and off, its replays included; the lean
and transformers stacks) and of generation, with losses, gradients and tokens equal to ``sdpa``'s."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from common.cli import UserError
from pipeline.inference.decode_latents import greedy_steps
from pipeline.inference.generate import generation_passes, latent_generate
from pipeline.latent.attention import kernel_report, pick_attention
from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import MethodConfig, layout
from pipeline.latent.reasoner import LatentReasoner
from tests.recording_kernel import CALLS, MASKLESS, registered
from tests.recording_kernel import NAME as KERNEL
from tests.tiny_models import tiny_llama
from tests.toy_records import RECORDS
from tests.toy_records import SPECIAL as SP

pytestmark = pytest.mark.unit
VOCAB, LAYERS = 100, 2
# method, curriculum stage, the passes of one step by kind (times the layers)
CASES = {
    "cot": (MethodConfig("cot"), 0, {"sequence": 1}),
    "coconut+simcot": (MethodConfig("coconut", c_thought=1, max_latent_stage=3, pad_latent_to_max=False,
                                    simcot=True), 4, {"question": 1, "latent": 2, "tail": 1, "step_decoder": 1}),
    "codi+simcot": (MethodConfig("codi", num_latent=4, simcot=True), 0,
                    {"question": 1, "latent": 3, "tail": 1, "teacher": 1, "step_decoder": 1}),
    "jacobi codi+simcot": (MethodConfig("codi", num_latent=4, simcot=True, latent_update="jacobi",
                                        jacobi_iterations=2), 0,
                           {"question": 1, "jacobi": 2, "tail": 1, "teacher": 1, "step_decoder": 1}),
}


@pytest.fixture(scope="module", autouse=True)
def recording_kernel():
    with registered():
        yield


def _lm(seed: int, kernel: str):
    model = tiny_llama(VOCAB, hidden=32, layers=LAYERS, seed=seed)
    model.config._attn_implementation = kernel
    return model


def _step(cfg, batch, kernel: str, body_forward: str, checkpointing: bool):
    """-> (losses, gradients by name, calls by pass kind) of one training step."""
    model = LatentReasoner(_lm(3, kernel), cfg, eos_id=SP["eos"], step_decoder=_lm(4, kernel) if cfg.simcot else None,
                           gradient_checkpointing=checkpointing, body_forward=body_forward)
    CALLS.clear()
    losses = model(batch)
    losses["total"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in losses.items()}, grads, Counter(kind for kind, _ in CALLS)


@pytest.mark.parametrize("body_forward", ["lean", "transformers"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_every_pass_of_a_training_step_calls_the_configured_kernel(case, checkpointing, body_forward):
    cfg, stage, passes = CASES[case]
    batch = collate_aligned([layout(r, SP, cfg, stage, [60, 61]) for r in RECORDS], SP["latent"], SP["pad"],
                            latent_span=max(cfg.n_latents(stage, len(r["step_ids"])) for r in RECORDS))
    losses, grads, calls = _step(cfg, batch, KERNEL, body_forward, checkpointing)
    replays = 2 if checkpointing else 1             # a checkpointed layer runs again in backward, same pass kind
    assert calls == Counter({kind: n * LAYERS * replays for kind, n in passes.items()})
    want_losses, want_grads, none = _step(cfg, batch, "sdpa", body_forward, checkpointing)
    assert not none                                  # sdpa itself never reaches the recording kernel
    for key, value in want_losses.items():
        assert losses[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert (grads[name] - grad).abs().max().item() <= 1e-5 * grad.abs().max().item() + 1e-12, name


def test_a_kernel_registered_without_a_mask_function_gets_no_mask_on_either_stack():
    """As transformers gives it: no mask in any pass; the lean stack computes what transformers' does."""
    cfg, stage, _ = CASES["codi+simcot"]
    batch = collate_aligned([layout(r, SP, cfg, stage, [60, 61]) for r in RECORDS], SP["latent"], SP["pad"])
    results = {}
    for body_forward in ("lean", "transformers"):
        results[body_forward] = _step(cfg, batch, MASKLESS, body_forward, False)[0]
        assert CALLS and not any(masked for _, masked in CALLS)
    assert results["lean"] == pytest.approx(results["transformers"], rel=1e-5)


def _prompts(n: int = 5, seed: int = 0) -> list[list[int]]:
    """Left-padded CODI-style prompts of different lengths and latent counts (2 to 4)."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(10, 80) for _ in range(rng.randint(2, 9))] + [SP["bot"]]
            + [SP["latent"]] * rng.randint(2, 4) + [SP["eot"]] for _ in range(n)]


@pytest.mark.parametrize("jacobi", [None, 2])
def test_generation_calls_the_configured_kernel_in_every_pass_and_decodes_sdpas_tokens(jacobi):
    prompts, new = _prompts(), 6
    kwargs = dict(eos_id=-1, max_new_tokens=new, jacobi_iterations=jacobi)
    want = latent_generate(_lm(3, "sdpa").eval(), prompts, SP["latent"], **kwargs)
    for body_forward in ("lean", "transformers"):
        CALLS.clear()
        assert latent_generate(_lm(3, KERNEL).eval(), prompts, SP["latent"], body_forward=body_forward,
                               **kwargs) == want
        latents = 4 if jacobi is None else 2         # the widest prompt's: column passes, or Jacobi iterations
        kinds = {"question": 1, "latent" if jacobi is None else "jacobi": latents - 1 if jacobi is None else jacobi,
                 "tail": 1, "decoding": new - 1}
        assert Counter(kind for kind, _ in CALLS) == Counter({k: n * LAYERS for k, n in kinds.items()}), body_forward


def test_lean_generation_decodes_transformers_tokens_on_ragged_left_padded_prompts():
    model = tiny_llama(VOCAB, hidden=64, layers=2, seed=5).eval()
    prompts = _prompts(n=8, seed=1)
    lean = latent_generate(model, prompts, SP["latent"], eos_id=-1, max_new_tokens=10, body_forward="lean")
    assert lean == latent_generate(model, prompts, SP["latent"], eos_id=-1, max_new_tokens=10,
                                   body_forward="transformers")
    assert lean == latent_generate(model, prompts, SP["latent"], eos_id=-1, max_new_tokens=10)    # auto: lean


def test_the_step_decoder_decodes_latents_through_the_configured_kernel():
    decoder, prefixes = _lm(4, KERNEL).eval(), torch.randn(5, 2, 32)
    embed = decoder.get_input_embeddings()
    CALLS.clear()
    with torch.no_grad():
        lean = greedy_steps(decoder, embed, prefixes, eos=-1, max_len=4, first_position=1, body_forward="lean")
    assert set(kind for kind, _ in CALLS) == {"step_decoder"} and len(CALLS) == 4 * LAYERS
    with torch.no_grad():
        assert lean == greedy_steps(_lm(4, "sdpa").eval(), embed, prefixes, eos=-1, max_len=4, first_position=1,
                                    body_forward="transformers")


def test_start_up_names_the_kernel_and_stack_of_every_kind_of_pass():
    cfg = CASES["codi+simcot"][0]
    model = LatentReasoner(_lm(3, KERNEL), cfg, eos_id=SP["eos"], step_decoder=_lm(4, "sdpa"), body_forward="lean")
    assert kernel_report(model.attention_passes()) == (
        f"question, latent, tail, teacher: {KERNEL} (lean stack); step_decoder: sdpa (lean stack)")
    generating = generation_passes(model.base, None, "lean", model.method.pass_kinds(cfg))
    assert kernel_report(generating) == f"question, latent, tail, decoding: {KERNEL} (lean stack)"


def test_a_kernel_that_cannot_run_here_or_is_not_registered_is_refused_at_start_up():
    assert pick_attention("auto", on_cuda=False) == "sdpa"
    assert pick_attention(KERNEL, on_cuda=False) == KERNEL
    with pytest.raises(UserError, match="flash_attention_4 cannot run here.*requirements-gpu.txt"):
        pick_attention("flash_attention_4", on_cuda=False)
    with pytest.raises(UserError, match="'fast_attention' is not a registered attention kernel.*AttentionInterface"):
        pick_attention("fast_attention", on_cuda=False)
