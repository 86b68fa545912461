"""Build the model a run trains: base LM (tiny in code, or pretrained), step decoder, LoRA, attention.

Under ZeRO-3 an ``HfDeepSpeedConfig`` is kept alive while models are built, so transformers
creates them inside ``deepspeed.zero.Init`` and an 8B model is never materialised whole on one rank.
"""
from __future__ import annotations

import os

import torch

from pipeline.engine.config import ConfigError, ModelSettings, RunConfig
from pipeline.latent.attention import pick_attention
from pipeline.latent.lean_forward import resolve_body_forward
from pipeline.latent.methods import get_method
from pipeline.latent.reasoner import LatentReasoner
from pipeline.latent.vocab import Vocab


def build_lm(settings: ModelSettings, vocab_size: int, attention: str):
    """One causal LM: the same call twice gives the same weights (decoder = copy of the base).
    A pretrained model is resized to the tokenizer (the latent tokens are new); the new rows get
    transformers' mean-resizing (CODI's); Coconut's latent rows are then overwritten (``seed_new_rows``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.init_seed)
    if settings.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(settings.name_or_path, attn_implementation=attention,
                                                     trust_remote_code=settings.trust_remote_code,
                                                     dtype=torch.float32)
        weight = model.get_input_embeddings().weight
        if getattr(weight, "ds_shape", weight.shape)[0] < vocab_size:      # ZeRO-3: the full, not the local, size
            model.resize_token_embeddings(vocab_size)
        return model
    t = settings.tiny
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                      num_key_value_heads=t.num_kv_heads, tie_word_embeddings=t.tie_word_embeddings,
                      max_position_embeddings=2048)
    cfg._attn_implementation = attention
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attention, dtype=torch.float32)


def build_step_decoder(settings: ModelSettings, vocab_size: int, decoder_vocab: int, attention: str):
    """The SIM-CoT step decoder at the reference's vocabulary, ``decoder_vocab`` (the tokenizer's
    before the latent tokens were added: its targets never hold one). A pretrained model keeps its
    own table, never resized (the reference loads it unresized); a model built in code is built as
    the base is (the same weights) and its added rows are cut off."""
    decoder = build_lm(settings, decoder_vocab if settings.name_or_path else vocab_size, attention)
    rows = decoder.get_output_embeddings().weight
    if not settings.name_or_path and getattr(rows, "ds_shape", rows.shape)[0] > decoder_vocab:
        decoder.resize_token_embeddings(decoder_vocab)
    return decoder


def new_rows_like(tokenizer, method: str) -> int | None:
    """The token whose rows the added latent tokens start as: the method's ``seed_rows_from``
    (Coconut's ``<<``, as the reference does); None (transformers' mean-resizing) for a method
    without one or a tokenizer where that text is not one token."""
    text = get_method(method).seed_rows_from
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return ids[0] if len(ids) == 1 else None


def seed_new_rows(run: RunConfig, rows: list[int], like: int | None, lm) -> list[int]:
    """Copy token ``like``'s rows into the latent tokens' ``rows`` (the ids data_prep added, beyond
    the pretrained table or inside a padded one). Skipped when ``checkpoint.init_from`` is a latent
    run's: its latent rows are trained, while a CoT run never feeds them (the reference resizes
    only when Coconut starts). Returns the rows written."""
    if like is None or not run.model.name_or_path or not rows:
        return []
    if run.checkpoint.init_from:
        source = init_run_method(run.checkpoint.init_from)
        if source is not None and get_method(source).uses_latent_tokens:
            return []
    copy_rows(lm, rows, like)     # the base's only: the step decoder has no rows for added tokens
    return rows


def init_run_method(init_from: str) -> str | None:
    """The method of the run that wrote ``checkpoint.init_from`` (a merged directory's, from its
    ``latent_config.json``; None: no config.yaml beside a checkpoint)."""
    from pipeline.engine.checkpoint import init_source
    from pipeline.engine.config import load_config
    from pipeline.inference.merged import LATENT_CONFIG, method_config, read_latent_config

    if os.path.isfile(os.path.join(init_from, LATENT_CONFIG)):
        return method_config(read_latent_config(init_from)).name
    ckpt_dir, _tag = init_source(init_from)
    config = os.path.join(os.path.dirname(ckpt_dir), "config.yaml")
    return load_config(config).method.name if os.path.isfile(config) else None


def copy_rows(model, rows: list[int], source: int) -> None:
    """Coconut's initialisation of the added tokens: the input-embedding row and the LM-head row of
    ``source`` (the reference uses ``<<``) copied into ``rows``. Under ZeRO-3 rank 0 writes the
    gathered tables and DeepSpeed re-partitions them to every rank."""
    import deepspeed

    tables = {id(t): t for t in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with deepspeed.zero.GatheredParameters(list(tables.values()), modifier_rank=0), torch.no_grad():
        if rank == 0:
            for table in tables.values():           # one table when the embeddings are tied
                table[rows] = table[source].clone()


def apply_lora(model, lora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def build_reasoner(run: RunConfig, vocab: Vocab, ds_config: dict | None, on_cuda: bool,
                   new_rows_like: int | None = None):
    """-> (LatentReasoner, attention name, keep-alive handle for HfDeepSpeedConfig). ``new_rows_like``:
    the token whose rows the latent tokens' rows start from (Coconut's ``<<``; None: transformers'
    mean-resizing)."""
    keep_alive = None
    if ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    attention = pick_attention(run.model.attn_implementation, on_cuda)
    base = build_lm(run.model, vocab.size, attention)
    # The step decoder is the base architecture with the base's starting weights (or the model of
    # model.decoder_path), never LoRA.
    decoder = (build_step_decoder(run.model.step_decoder(), vocab.size, vocab.original, attention)
               if run.method.simcot else None)
    initialised = None
    if run.checkpoint.init_from:
        from pipeline.engine.checkpoint import load_base_weights

        initialised = load_base_weights(base, decoder, run.checkpoint.init_from, run.method.decoder_init)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"initialised weights from {initialised.source}"
                  f"{f'; step decoder from {initialised.decoder_origin}' if decoder is not None else ''}", flush=True)
    seeded = seed_new_rows(run, list(vocab.added_ids()), new_rows_like, base)
    if seeded and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(f"token rows {seeded} start as token {new_rows_like}'s ({run.method.name})", flush=True)
    if run.model.lora.enabled:
        base = apply_lora(base, run.model.lora)
    try:
        body_forward = resolve_body_forward(run.model.body_forward, base.config)
    except ValueError as err:
        raise ConfigError(f"model.{err}; set model.body_forward=auto") from None
    model = LatentReasoner(base, run.method, eos_id=vocab.special["eos"], step_decoder=decoder,
                           masked_classes=get_method(run.method.name).masked_classes(vocab.special, vocab.original),
                           gradient_checkpointing=run.model.gradient_checkpointing, body_forward=body_forward)
    if initialised and initialised.projection and model.projection is not None:
        from pipeline.engine.checkpoint import load_projection

        load_projection(model.projection, initialised.projection, initialised.source)
    if keep_alive is not None and ds_config.get("bf16", {}).get("enabled"):
        # zero.Init built the LMs in bf16; modules made outside it (CODI's projection) must match,
        # or ZeRO-3 refuses to flatten mixed dtypes (found on the H100 check).
        for param in model.parameters():
            if not hasattr(param, "ds_id"):
                param.data = param.data.to(torch.bfloat16)
    return model, attention, keep_alive


def is_norm(module) -> bool:
    """LayerNorm, and the RMSNorm classes of transformers' models (LlamaRMSNorm, ...)."""
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """The trainable parameters in HF Trainer's two groups (the CODI reference's): weight decay on
    every weight but biases and normalisation weights, which get none."""
    no_decay = {id(p) for module in model.modules() for name, p in module.named_parameters(recurse=False)
                if name == "bias" or is_norm(module)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in no_decay], "weight_decay": weight_decay},
              {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]      # LoRA trains no bias and no norm


def count_params(module) -> tuple[int, int]:
    """(total, trainable) parameter counts; under ZeRO-3 the full (not partitioned) sizes."""
    total = trainable = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
