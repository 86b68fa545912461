"""The reference Coconut forward, pinned by ``shared/fixtures/coconut_golden``."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.latent.loop import coconut_forward

pytestmark = pytest.mark.fidelity


@pytest.fixture(scope="module")
def golden(shared_fixtures):
    root = shared_fixtures / "coconut_golden"
    expected = json.loads((root / "expected.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(root / "tiny_llama", attn_implementation="sdpa").eval()
    batch = {k: torch.tensor(v) for k, v in expected["equal_latents"]["batch"].items()}
    return model, batch, expected


def test_loss_and_logits_match_the_reference(golden):
    model, batch, expected = golden
    with torch.no_grad():
        loss, logits = coconut_forward(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                       batch["labels"], expected["token_ids"]["latent"])
    real = batch["attention_mask"].bool()
    reference = torch.tensor(expected["equal_latents"]["logits"])
    assert list(logits.shape) == expected["equal_latents"]["logits_shape"]
    assert abs(loss.item() - expected["equal_latents"]["loss"]) < 1e-4
    assert (logits[real] - reference[real]).abs().max().item() < 1e-4


def test_each_row_alone_gives_the_same_logits_as_the_batch(golden):
    model, batch, expected = golden
    latent = expected["token_ids"]["latent"]
    with torch.no_grad():
        _, together = coconut_forward(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                      batch["labels"], latent)
        for row in range(3):
            real = batch["attention_mask"][row].bool()
            one = {k: v[row:row + 1, real] for k, v in batch.items()}
            _, alone = coconut_forward(model, one["input_ids"], one["attention_mask"], one["position_ids"],
                                       one["labels"], latent)
            assert (alone[0] - together[row, real]).abs().max().item() < 1e-5
