"""Flash attention against SDPA on a GPU: padded batches and the KV-cached latent passes give the
same logits (bf16). Skipped without CUDA or without an installed flash attention (requirements-gpu.txt)."""
import pytest
import torch

from pipeline.inference.generate import latent_generate, left_pad_prompts
from pipeline.latent.attention import flash_kernels
from pipeline.latent.collate import positions_from_mask
from pipeline.latent.loop import fill_latents, latent_block

pytestmark = pytest.mark.gpu
LATENT = 7


def _flash() -> str:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    name = next((kernel for kernel, ok in flash_kernels(on_cuda=True).items() if ok), None)
    if name is None:
        pytest.skip("no flash attention installed (pip install -r requirements-gpu.txt)")
    return name


def _pair(attention: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    models = []
    for impl in ("sdpa", attention):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        models.append(LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=torch.bfloat16).cuda().eval())
    return models


def _prompts():
    return [[1, 20, 21, 22, 23, 24, 25, 26, 3] + [LATENT] * 4 + [5], [1, 30, 31, 3] + [LATENT] * 4 + [5]]


@torch.no_grad()
def test_flash_attention_gives_sdpas_logits_on_a_padded_batch():
    sdpa, flash = _pair(_flash())
    ids, mask = left_pad_prompts(_prompts(), pad_id=0)
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    a, b = sdpa(**kwargs).logits.float(), flash(**kwargs).logits.float()
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() < 5e-2


@torch.no_grad()
def test_flash_attention_gives_sdpas_logits_through_the_kv_cached_latent_passes():
    sdpa, flash = _pair(_flash())
    ids, mask = left_pad_prompts(_prompts(), pad_id=0)
    ids, mask = ids.cuda(), mask.cuda()
    first, n, latent_mask = latent_block(ids, LATENT)
    hidden = []
    for model in (sdpa, flash):
        embeds = model.get_input_embeddings()(ids)
        passes = fill_latents(model.get_decoder(), embeds, mask, positions_from_mask(mask), first, n,
                              latent_mask=latent_mask)
        hidden.append(model.get_output_embeddings()(passes.hidden).float())
    real = mask.bool()
    assert (hidden[0][real] - hidden[1][real]).abs().max().item() < 5e-2


@torch.no_grad()
def test_batched_generation_runs_on_the_flash_path():
    _, flash = _pair(_flash())
    tokens = latent_generate(flash, _prompts(), LATENT, eos_id=-1, max_new_tokens=8)
    assert [len(t) for t in tokens] == [8, 8]
