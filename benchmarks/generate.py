"""Benchmark P2 (``python -m benchmarks generate``): Coconut latent inference, batched and
KV-cached (``latent_generate``) vs the reference's loop (one problem at a time; latents filled
once, then every new token re-runs the whole sequence without a cache), in one process, on the
same model and prompts, with EOS disabled so every prompt runs to length. Tokens must be equal.
"""
from __future__ import annotations

import time

import torch

from benchmarks.fixtures import SPECIAL, bench_model, latent_prompts
from pipeline.inference.generate import latent_generate
from pipeline.latent.loop import fill_latents, latent_block


@torch.no_grad()
def reference_generate(model, prompt: list[int], latent_id: int, max_new_tokens: int) -> list[int]:
    """One problem, no KV cache: the reference Coconut ``generate``."""
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.size(1))[None]
    embeds = model.get_input_embeddings()(ids)
    first, n, _ = latent_block(ids, latent_id)
    passes = fill_latents(model.get_decoder(), embeds, mask, positions, first, n)
    filled = embeds.clone()
    filled[:, first:first + n] = passes.latents
    tokens = []
    logits = model.get_output_embeddings()(passes.hidden[:, -1])
    for _ in range(max_new_tokens):
        token = int(logits.argmax(-1))
        tokens.append(token)
        filled = torch.cat([filled, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
        hidden = model.get_decoder()(inputs_embeds=filled).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, -1])
    return tokens


def main(n_prompts: int = 32, n_latents: int = 10, new_tokens: int = 64) -> None:
    torch.set_num_threads(2)
    model = bench_model(1000).eval()
    batch, latent = latent_prompts(n_prompts, 1000, n_latents), SPECIAL["latent"]
    latent_generate(model, batch[:2], latent, eos_id=-1, max_new_tokens=4)          # warm-up
    ours, base = [], []
    for _ in range(3):
        start = time.perf_counter()
        fast = latent_generate(model, batch, latent, eos_id=-1, max_new_tokens=new_tokens)
        ours.append(time.perf_counter() - start)
    start = time.perf_counter()
    slow = [reference_generate(model, p, latent, new_tokens) for p in batch]
    base.append(time.perf_counter() - start)
    equal = fast == slow
    speedup = min(base) / sorted(ours)[1]
    print(f"P2 Coconut inference, {n_prompts} prompts x {n_latents} latents, {new_tokens} new tokens, 4 layers / "
          f"hidden 256: batched+cached {n_prompts / sorted(ours)[1]:.1f} problems/s "
          f"(median of 3, {min(ours):.2f}-{max(ours):.2f}s) vs reference loop {n_prompts / min(base):.2f} problems/s "
          f"= {speedup:.1f}x (goal >= 20x); tokens identical: {equal}")
