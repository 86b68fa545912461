"""The shape of the model a run config builds, without its weights: for memory plans and recipe checks.

    sizes = model_sizes(load_config("configs/llama3.1-8b-codi-simcot.yaml"))
    sizes.total, sizes.trainable, sizes.largest_module

The ``LatentReasoner`` (base LM, LoRA, CODI projection, SIM-CoT step decoder) is built on the
meta device from the model's config: a local directory's ``config.json`` or the HF cache when
there is one, else the public shapes below (written from the models' published configs, so the
recipes plan and build with no download).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.engine.config import ConfigError, ModelSettings, RunConfig
from pipeline.latent.methods.base import ADDED_TOKENS

# Published shapes (config.json of each hub model): hidden, intermediate, layers, heads, kv heads, tied.
_LLAMA3 = {"vocab_size": 128_256, "rope_theta": 500_000.0, "max_position_embeddings": 131_072}
_SMOLLM2 = {"vocab_size": 49_152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
            "max_position_embeddings": 8192, "rope_theta": 100_000.0}
KNOWN_SHAPES = {
    "meta-llama/Llama-3.2-1B-Instruct": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192,
                                         "num_hidden_layers": 16, "num_attention_heads": 32,
                                         "num_key_value_heads": 8, "tie_word_embeddings": True},
    "meta-llama/Llama-3.2-3B-Instruct": {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192,
                                         "num_hidden_layers": 28, "num_attention_heads": 24,
                                         "num_key_value_heads": 8, "tie_word_embeddings": True},
    "meta-llama/Llama-3.1-8B-Instruct": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                                         "num_hidden_layers": 32, "num_attention_heads": 32,
                                         "num_key_value_heads": 8, "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-70B-Instruct": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672,
                                          "num_hidden_layers": 80, "num_attention_heads": 64,
                                          "num_key_value_heads": 8, "tie_word_embeddings": False},
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2,
    "models/smollm2-135m": _SMOLLM2,            # what `make smollm2` writes (the same model, from its GGUF)
    "openai-community/gpt2": {"model_type": "gpt2", "vocab_size": 50_257, "n_embd": 768, "n_layer": 12,
                              "n_head": 12, "n_positions": 1024},
}
# Rows data_prep adds to a pretrained tokenizer (every ADDED_TOKENS, pad included where it has
# none), and to the SentencePiece one it trains for the tiny model (which has its own pad).
ADDED_ROWS = len(ADDED_TOKENS)
TINY_ADDED_ROWS = ADDED_ROWS - 1


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts (elements, not bytes) of one run's LatentReasoner, and the base's shape."""
    total: int                 # every parameter: base (+ LoRA), projection, step decoder
    trainable: int
    loop_trainable: int        # trainable outside the step decoder (base, LoRA, projection): used by every pass
    base: int
    decoder: int
    largest_module: int        # the most parameters one module holds directly (an embedding, usually)
    layer: int                 # one decoder layer of the base
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int                # key/value width (GQA: kv heads x head dim)
    vocab: int


def lm_config(run: RunConfig, vocab_size: int | None = None, settings: ModelSettings | None = None):
    """The base LM's HF config (or that of ``settings``: the step decoder's): tiny from the run, else
    local/cached ``config.json``, else a known shape."""
    from transformers import AutoConfig, LlamaConfig

    m = settings or run.model
    if not m.name_or_path:
        t = m.tiny
        return LlamaConfig(vocab_size=vocab_size or 512, hidden_size=t.hidden_size,
                           intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
                           num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                           tie_word_embeddings=t.tie_word_embeddings, max_position_embeddings=2048)
    try:
        cfg = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code,
                                         local_files_only=m.name_or_path in KNOWN_SHAPES)
    except OSError:
        if m.name_or_path not in KNOWN_SHAPES:
            raise ConfigError(f"model.name_or_path={m.name_or_path}: no config.json there or in the HF cache, and "
                             f"not a known shape ({', '.join(KNOWN_SHAPES)})") from None
        shape = dict(KNOWN_SHAPES[m.name_or_path])
        cfg = AutoConfig.for_model(shape.pop("model_type", "llama"), **shape)
    if vocab_size is None:
        vocab_size = cfg.vocab_size + ADDED_ROWS
    cfg.vocab_size = max(cfg.vocab_size, vocab_size)     # the trainer resizes to the tokenizer the same way
    return cfg


def meta_reasoner(run: RunConfig, vocab_size: int | None = None, decoder_vocab: int | None = None):
    """The run's LatentReasoner on the meta device: every module and shape, no memory, no download.
    The step decoder keeps a pretrained model's own table; one built in code has ``decoder_vocab``
    rows (the tokenizer's before data_prep added its tokens; None: the base's less those tokens)."""
    from transformers import AutoModelForCausalLM

    from pipeline.engine.build_model import apply_lora
    from pipeline.latent.reasoner import LatentReasoner

    cfg = lm_config(run, vocab_size)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(cfg)
        decoder = None
        if run.method.simcot:
            settings = run.model.step_decoder()
            rows = 0 if settings.name_or_path else decoder_vocab or cfg.vocab_size - TINY_ADDED_ROWS
            decoder = AutoModelForCausalLM.from_config(lm_config(run, rows, settings))   # 0: its own table
        if run.model.lora.enabled:
            base = apply_lora(base, run.model.lora)
        return LatentReasoner(base, run.method, eos_id=0, step_decoder=decoder,
                              gradient_checkpointing=run.model.gradient_checkpointing)


def model_sizes(run: RunConfig, vocab_size: int | None = None, decoder_vocab: int | None = None) -> ModelSizes:
    from transformers.modeling_layers import GradientCheckpointingLayer  # every HF decoder block is one

    model = meta_reasoner(run, vocab_size, decoder_vocab)
    params = list(model.parameters())           # tied weights appear once
    cfg = model.base.config
    layer = next(m for m in model.base.modules() if isinstance(m, GradientCheckpointingLayer))
    decoder = list(model.step_decoder.parameters()) if model.step_decoder is not None else []
    decoder_trainable = sum(p.numel() for p in decoder if p.requires_grad)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return ModelSizes(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        loop_trainable=sum(p.numel() for p in params if p.requires_grad) - decoder_trainable,
        base=sum(p.numel() for p in model.base.parameters()),
        decoder=sum(p.numel() for p in decoder),
        largest_module=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        layer=sum(p.numel() for p in layer.parameters()),
        layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
        intermediate=getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size,
        kv_dim=cfg.hidden_size * kv_heads // heads, vocab=cfg.vocab_size)
