"""Tiny checkpoints in the released layouts, and the references' evaluation loops, for the import tests.

The modules are built as the references build theirs (InternLM/SIM-CoT ``CODI/src/model.py``:
``codi`` the base resized by three rows and wrapped by PEFT's ``get_peft_model`` with the
reference's ``LoraConfig``, ``prj`` its Sequential with ``ln`` added, ``decoder`` the unresized
base; ``Coconut/coconut.py``: ``base_causallm`` and its ``embedding`` alias) and saved as their
trainers save them (the whole module's state dict as ``model.safetensors``, sharded with an index,
``pytorch_model.bin``, or Coconut's ``torch.save`` to ``checkpoint_N``). The loops transcribe
``CODI/test.py``'s greedy generation and Coconut's ``generate`` call for call, in our own words.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tests.fidelity.codi_reference import cuda_sdpa_mask

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]        # test.py's for "gpt2": Conv1D layers (weights in x out)


def save_base(out: str, tok, seed: int = 0) -> str:
    """A tiny LLaMA of ``len(tok)`` rows with peaked logits (std 0.3, as a trained model's) and its
    tokenizer: the ``--base`` the release was "trained from"."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.3, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


class ReferenceCODI(nn.Module):
    """``CODI/src/model.py``'s module: ``codi``, ``prj`` and (SIM-CoT) ``decoder``."""

    def __init__(self, base: str, lora_r: int = 8, lora_alpha: int = 32, decoder: bool = True, seed: int = 1,
                 targets: list[str] = LLAMA_TARGETS):
        from peft import LoraConfig, TaskType, get_peft_model

        super().__init__()
        torch.manual_seed(seed)
        self.codi = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.vocab = self.codi.config.vocab_size
        self.pad_id, self.bot_id, self.eot_id = self.vocab, self.vocab + 1, self.vocab + 2
        self.codi.resize_token_embeddings(self.vocab + 3)
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=lora_r, lora_alpha=lora_alpha,
                            lora_dropout=0.1, target_modules=targets, init_lora_weights=True)
        self.codi = get_peft_model(self.codi, config)
        with torch.no_grad():              # a trained adapter: B is no longer zero
            for name, param in self.codi.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2)
        hidden = self.codi.config.hidden_size
        self.prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.prj.add_module("ln", nn.LayerNorm(hidden))
        if decoder:
            self.decoder = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.eval()


def save_codi(module: nn.Module, out: str, layout: str = "single") -> str:
    """The module's state dict as the release ships it, with SIM-CoT's 0-byte ``config.json``."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    if layout == "single":
        save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin":
        torch.save(state, os.path.join(out, "pytorch_model.bin"))
    else:                                  # two shards and their index
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in shards.items():
            save_file({k: state[k] for k in part}, os.path.join(out, name), metadata={"format": "pt"})
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {}, "weight_map": {k: n for n, part in shards.items() for k in part}}, handle)
    open(os.path.join(out, "config.json"), "w").close()
    return out


def reference_tokenizer(base: str):
    """``test.py``'s tokenizer: the base's, padded left, ``[PAD]`` added (id V) where it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base, padding_side="left")
    if tok.pad_token_id is None:
        tok.add_special_tokens({"pad_token": "[PAD]"})
    return tok


@torch.no_grad()
def codi_test_loop(ref: ReferenceCODI, tok, questions: list[str], batch_size: int, num_latent: int = 6,
                   max_new: int = 256) -> list[list[int]]:
    """``CODI/test.py`` with ``--greedy True --use_prj True --remove_eos True``: per batch the
    question (its padding mask made as transformers 4.5x makes it for SDPA on CUDA), ``num_latent``
    latent passes and the decoding through the cache with no mask, logits cut to V+2."""
    questions = [q.strip().replace("  ", " ") for q in questions]
    embed, outputs = ref.codi.get_input_embeddings(), []
    for start in range(0, len(questions), batch_size):
        batch = tok(questions[start:start + batch_size], return_tensors="pt", padding="longest")
        rows = batch["input_ids"].size(0)
        ids = torch.cat([batch["input_ids"], torch.full((rows, 1), ref.bot_id)], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones(rows, 1, dtype=torch.long)], dim=1)
        out = ref.codi(input_ids=ids, attention_mask=cuda_sdpa_mask(mask, torch.float32), use_cache=True,
                       output_hidden_states=True)
        cache, latent = out.past_key_values, ref.prj(out.hidden_states[-1][:, -1:, :])
        for _ in range(num_latent):
            out = ref.codi(inputs_embeds=latent, use_cache=True, output_hidden_states=True, past_key_values=cache)
            cache, latent = out.past_key_values, ref.prj(out.hidden_states[-1][:, -1:, :])
        step = embed(torch.tensor([ref.eot_id])).unsqueeze(0).expand(rows, -1, -1)
        finished, tokens = [False] * rows, [[] for _ in range(rows)]
        for _ in range(max_new):
            out = ref.codi(inputs_embeds=step, use_cache=True, past_key_values=cache)
            cache = out.past_key_values
            next_ids = out.logits[:, -1, :ref.codi.config.vocab_size - 1].argmax(dim=-1)
            for b in range(rows):
                if not finished[b]:
                    tokens[b].append(int(next_ids[b]))
                    finished[b] = int(next_ids[b]) == tok.eos_token_id
            if all(finished):
                break
            step = embed(next_ids).unsqueeze(1)
        outputs += tokens
    return outputs


def save_gpt2_base(out: str, tok, seed: int = 0) -> str:
    """A tiny GPT-2 (tied embeddings, Conv1D layers) of ``len(tok)`` rows and its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512, initializer_range=0.3,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


class ReferenceCoconut(nn.Module):
    """``Coconut/coconut.py``'s ``Coconut``: ``base_causallm`` resized to the tokenizer with the three
    latent tokens appended (their rows start as ``<<``'s, as ``run.py`` does) and ``embedding``, an
    alias of its input embeddings."""

    def __init__(self, base: str, seed: int = 2):
        from transformers import AutoTokenizer

        super().__init__()
        torch.manual_seed(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.tokenizer.pad_token = self.tokenizer.eos_token
        for text in ("<|start-latent|>", "<|end-latent|>", "<|latent|>"):
            self.tokenizer.add_tokens(text)
        ids = self.tokenizer.convert_tokens_to_ids
        self.start_id, self.end_id, self.latent_id = ids("<|start-latent|>"), ids("<|end-latent|>"), ids("<|latent|>")
        self.base_causallm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.base_causallm.resize_token_embeddings(len(self.tokenizer))
        with torch.no_grad():                    # trained: every table row its own
            self.base_causallm.get_input_embeddings().weight.normal_(0, 0.3)
        self.embedding = self.base_causallm.get_input_embeddings()
        self.eval()


@torch.no_grad()
def coconut_generate(ref: ReferenceCoconut, question: str, n_latents: int, max_new: int = 64) -> list[int]:
    """``run.py``'s evaluation of one question: ``question + "\\n"`` then ``<|start-latent|>``, the
    latents and ``<|end-latent|>``; each latent the last hidden state of the position before it
    (``Coconut.forward``), then greedy decoding recomputing the whole sequence each token
    (``Coconut.generate``): the first token taken as is, later ones until EOS."""
    tok, model = ref.tokenizer, ref.base_causallm
    ids = tok(question + "\n")["input_ids"] + [ref.start_id] + [ref.latent_id] * n_latents + [ref.end_id]
    embeds = ref.embedding(torch.tensor([ids]))
    for position in [i for i, t in enumerate(ids) if t == ref.latent_id]:
        hidden = model(inputs_embeds=embeds[:, :position], output_hidden_states=True).hidden_states[-1]
        embeds = torch.cat([embeds[:, :position], hidden[:, -1:], embeds[:, position + 1:]], dim=1)
    tokens = [int(model(inputs_embeds=embeds).logits[0, -1].argmax())]
    embeds = torch.cat([embeds, ref.embedding(torch.tensor([[tokens[0]]]))], dim=1)
    for _ in range(max_new - 1):
        token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
        if token == tok.eos_token_id:
            break
        tokens.append(token)
        embeds = torch.cat([embeds, ref.embedding(torch.tensor([[token]]))], dim=1)
    return tokens


def save_coconut(ref: ReferenceCoconut, out: str, epoch: int = 24) -> str:
    """``run.py``'s ``torch.save(model.state_dict(), save_dir/checkpoint_{epoch})``."""
    os.makedirs(out, exist_ok=True)
    torch.save(ref.state_dict(), os.path.join(out, f"checkpoint_{epoch}"))
    return out
