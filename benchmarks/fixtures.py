"""What the benchmarks share: special-token ids, a LLaMA of a chosen shape, and GSM8k-Aug-shaped
synthetic problems and prompts (seeded, so every benchmark and rerun sees the same inputs)."""
from __future__ import annotations

import random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SPECIAL = {"bos": 1, "eos": 2, "pad": 0, "start_latent": 3, "latent": 4, "end_latent": 5, "bot": 6, "eot": 7,
           "step_open": 14, "step_close": 15, "step_open_spaced": 16}
PREFIX = [10, 11, 12, 13]
SEPARATOR = 17


def bench_model(vocab: int, layers: int = 4, hidden: int = 256, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def synthetic_records(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Problems shaped like GSM8k-Aug: ~40 question tokens, 3-4 steps of ~10 tokens, short answer."""
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(20, vocab) for _ in range(k)]  # noqa: E731
    step = lambda: [SPECIAL["step_open"], *tok(rng.randint(5, 9)), SPECIAL["step_close"], SEPARATOR]  # noqa: E731
    records = [{"question_ids": [1] + tok(rng.randint(36, 44)), "step_ids": [step() for _ in range(rng.randint(3, 4))],
                "answer_ids": PREFIX + tok(2)} for _ in range(n)]
    for r in records:       # CODI's teacher text: joined as a byte-level BPE joins it (" <<" merged, no separator)
        r["teacher_cot_ids"], r["cot_ids"] = _joined(r["step_ids"][:-1]), _joined(r["step_ids"])
    return records


def _joined(steps: list[list[int]]) -> list[int]:
    return [t for i, s in enumerate(steps) for t in [SPECIAL["step_open_spaced"] if i else s[0], *s[1:-1]]]


def latent_prompts(n: int, vocab: int, n_latents: int, seed: int = 0) -> list[list[int]]:
    """Coconut prompts of ~40 question tokens: ``question <start> <latent> x n <end>``."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(10, vocab) for _ in range(rng.randint(36, 44))] + [SPECIAL["start_latent"]]
            + [SPECIAL["latent"]] * n_latents + [SPECIAL["end_latent"]] for _ in range(n)]
