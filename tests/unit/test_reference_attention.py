"""``method.reference_attention``: CODI's released attention, checked against the HF model run the
way ``CODI/src/model.py`` and ``CODI/test.py`` run it: the question with its mask (as transformers
4.5x builds it for SDPA on CUDA, transcribed in tests/fidelity/codi_reference.py), then each latent
and the answer through the KV cache with no mask and HF's default positions; on eager and SDPA."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.inference.generate import latent_generate
from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import MethodConfig, get_method, layout
from pipeline.latent.reasoner import LatentReasoner
from tests.fidelity.codi_reference import cuda_sdpa_mask
from tests.tiny_models import tiny_llama
from tests.toy_records import RECORDS
from tests.toy_records import SPECIAL as SP

pytestmark = pytest.mark.unit
N = 3


def _model(reference: bool, attention: str = "sdpa") -> LatentReasoner:
    cfg = MethodConfig("codi", num_latent=N, reference_attention=reference)
    base = tiny_llama(100)
    base.set_attn_implementation(attention)
    return LatentReasoner(base, cfg, eos_id=SP["eos"]).eval()


def _batch(records):
    cfg = MethodConfig("codi", num_latent=N)
    return collate_aligned([layout(r, SP, cfg, 0, prefix_ids=[60, 61]) for r in records], SP["latent"], 0)


@torch.no_grad()
def _reference_run(model: LatentReasoner, ids: torch.Tensor, mask: torch.Tensor, first: int, steps: int = 0):
    """The reference's calls -> (logits of every column after the last latent, greedy tokens)."""
    base = model.base
    out = base(input_ids=ids[:, :first], attention_mask=cuda_sdpa_mask(mask[:, :first], torch.float32),
               use_cache=True, output_hidden_states=True)
    cache, latent = out.past_key_values, model.projection(out.hidden_states[-1][:, -1:])
    for _ in range(N):
        out = base(inputs_embeds=latent, cache=cache, use_cache=True, output_hidden_states=True)
        cache, latent = out.past_key_values, model.projection(out.hidden_states[-1][:, -1:])
    out = base(input_ids=ids[:, first + N:], cache=cache, use_cache=True)
    logits, tokens = out.logits, []
    for _ in range(steps):
        tokens.append(out.logits[:, -1].argmax(-1))
        out = base(input_ids=tokens[-1][:, None], cache=out.past_key_values, use_cache=True)
    return logits, torch.stack(tokens, 1) if tokens else None


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_answer_loss_is_the_references_on_a_left_padded_batch(attention):
    batch = _batch(RECORDS)                          # question lengths 4, 2, 6: rows 0 and 1 left-padded
    assert not batch.attention_mask.all()
    model = _model(reference=True, attention=attention)
    with torch.no_grad():
        ours = model(batch)["answer_ce"]
    logits, _ = _reference_run(model, batch.input_ids, batch.attention_mask, batch.first_latent)
    labels = batch.labels[:, batch.first_latent + N + 1:]
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert abs(ours.item() - reference.item()) <= 1e-5
    with torch.no_grad():
        assert abs(_model(reference=False)(batch)["answer_ce"].item() - ours.item()) > 1e-4   # the quirk matters


def test_without_padding_the_switch_changes_nothing():
    batch = _batch(RECORDS[:1])
    with torch.no_grad():
        on, off = _model(True)(batch), _model(False)(batch)
    assert all(abs(on[k].item() - off[k].item()) <= 1e-6 for k in ("answer_ce", "teacher_ce", "distill"))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_generation_decodes_as_the_reference_on_a_left_padded_batch(attention):
    model = _model(reference=True, attention=attention)
    cfg = MethodConfig("codi", num_latent=N)
    prompts = [get_method(cfg.name).prompt(cfg, r["question_ids"], SP, N) for r in RECORDS]
    ours = latent_generate(model.base, prompts, SP["latent"], eos_id=-1, max_new_tokens=5,
                           project=model.projection, reference_attention=True)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    first = width - N - 1                           # prompts end <latent> x N <eot>, aligned on the right
    _, tokens = _reference_run(model, ids, mask, first, steps=5)
    assert ours == tokens.tolist()
    plain = latent_generate(model.base, prompts, SP["latent"], eos_id=-1, max_new_tokens=5, project=model.projection)
    assert plain[2] == ours[2] and plain[:2] != ours[:2]        # only the left-padded rows differ


def test_a_left_pads_query_row_attends_every_column_and_real_rows_are_causal():
    """The rule itself (transformers 4.5x's ``_unmask_unattended`` on CUDA), next to its transcription."""
    from pipeline.latent.reference_quirks import pad_rows_attend_all

    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    ours = pad_rows_attend_all(mask, torch.float32)
    assert torch.equal(ours, cuda_sdpa_mask(mask, torch.float32))
    allowed = (ours == 0)[:, 0]
    assert allowed[0, :2].all()                                   # the pads' rows: every column
    assert allowed[0, 2].tolist() == [False, False, True, False]  # real rows: causal, pads masked
    assert torch.equal(allowed[1], torch.ones(4, 4, dtype=torch.bool).tril())
