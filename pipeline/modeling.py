"""Build the model a run trains: base LM (tiny in code, or pretrained), step decoder, LoRA, attention.

Under ZeRO-3 an ``HfDeepSpeedConfig`` is kept alive while models are built, so transformers
creates them inside ``deepspeed.zero.Init`` and an 8B model is never materialised whole on one rank.
"""
from __future__ import annotations

import torch

from .config import ConfigError, ModelSettings, RunConfig
from .layouts import LayoutConfig
from .model import LatentReasoner, ReasonerConfig


def pick_attention(requested: str, on_cuda: bool) -> str:
    """``auto``: FlashAttention-4 on Hopper or newer GPUs where ``flash-attn-4`` imports, else
    FlashAttention-2 where ``flash-attn`` imports, else SDPA (the caller prints which, once).
    An explicit choice that cannot run is refused with the package to install."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_4_available

    available = {"flash_attention_4": on_cuda and is_flash_attn_4_available()
                 and torch.cuda.get_device_capability()[0] >= 9,
                 "flash_attention_2": on_cuda and is_flash_attn_2_available()}
    if requested == "auto":
        return next((name for name, ok in available.items() if ok), "sdpa")
    if requested in available and not available[requested]:
        raise ConfigError(f"model.attn_implementation={requested} cannot run here (needs CUDA and "
                         f"`pip install -r requirements-gpu.txt`); use auto or sdpa")
    return requested


def build_lm(settings: ModelSettings, vocab_size: int, attention: str):
    """One causal LM: the same call twice gives the same weights (decoder = copy of the base)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.init_seed)
    if settings.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(settings.name_or_path, attn_implementation=attention,
                                                     trust_remote_code=settings.trust_remote_code,
                                                     dtype=torch.float32)
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    t = settings.tiny
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                      num_key_value_heads=t.num_kv_heads, tie_word_embeddings=t.tie_word_embeddings,
                      max_position_embeddings=2048)
    cfg._attn_implementation = attention
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attention, dtype=torch.float32)


def apply_lora(model, lora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def layout_config(run: RunConfig) -> LayoutConfig:
    m = run.method
    return LayoutConfig(m.name, m.c_thought, m.max_latent_stage, m.pad_latent_to_max, m.num_latent,
                        m.include_last_step, m.simcot)


def reasoner_config(run: RunConfig) -> ReasonerConfig:
    m = run.method
    return ReasonerConfig(layout_config(run), m.step_loss_weight, m.step_loss_norm, m.distill_factor,
                          m.distill_div_std, m.teacher_loss_weight, run.model.gradient_checkpointing)


def build_reasoner(run: RunConfig, vocab_size: int, eos_id: int, ds_config: dict | None, on_cuda: bool):
    """-> (LatentReasoner, attention name, keep-alive handle for HfDeepSpeedConfig)."""
    keep_alive = None
    if ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    attention = pick_attention(run.model.attn_implementation, on_cuda)
    base = build_lm(run.model, vocab_size, attention)
    # The step decoder is the base architecture with the base's starting weights, never LoRA.
    decoder = build_lm(run.model, vocab_size, attention) if run.method.simcot else None
    if run.checkpoint.init_from:
        from .checkpoint import load_base_weights

        source = load_base_weights(base, decoder, run.checkpoint.init_from)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"initialised weights from {source}", flush=True)
    if run.model.lora.enabled:
        base = apply_lora(base, run.model.lora)
    model = LatentReasoner(base, reasoner_config(run), eos_id=eos_id, step_decoder=decoder)
    if keep_alive is not None and ds_config.get("bf16", {}).get("enabled"):
        # zero.Init built the LMs in bf16; modules made outside it (CODI's projection) must match,
        # or ZeRO-3 refuses to flatten mixed dtypes (found on the H100 check).
        for param in model.parameters():
            if not hasattr(param, "ds_id"):
                param.data = param.data.to(torch.bfloat16)
    return model, attention, keep_alive


def count_params(module) -> tuple[int, int]:
    """(total, trainable) parameter counts; under ZeRO-3 the full (not partitioned) sizes."""
    total = trainable = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
