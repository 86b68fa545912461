"""The reference Coconut forward, pinned by ``shared/fixtures/coconut_golden``."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.fidelity.coconut_seam import coconut_forward

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


def test_rows_with_fewer_latents_are_filled_row_by_row_as_the_reference_does(golden):
    """The reference's forward fills pass i only in rows that hold an i-th latent (its
    pad_latent_to_max: false and uniform_prob batches): the golden rows with 4, 2 and 0 latents,
    collated by its rules, each give the logits they give alone."""
    from pipeline.latent.collate import align_rows

    model, batch, expected = golden
    latent = expected["token_ids"]["latent"]
    rows = []
    for row, keep in zip(range(3), (4, 2, 0)):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        first = ids.index(latent)
        rows.append(ids[:first + keep] + ids[first + 4:])
    anchors = [r.index(latent) if latent in r else -1 for r in rows]
    anchors = [a if a >= 0 else max(anchors) for a in anchors]          # a row without latents is not shifted
    ids, mask, positions = align_rows(rows, anchors, expected["token_ids"]["pad"])
    labels = torch.where(mask.bool(), ids, -100)
    with torch.no_grad():
        _, together = coconut_forward(model, ids, mask, positions, labels, latent)
        for row, tokens in enumerate(rows):
            one = torch.tensor([tokens])
            _, alone = coconut_forward(model, one, torch.ones_like(one), torch.arange(len(tokens))[None], one, latent)
            assert (alone[0] - together[row, mask[row].bool()]).abs().max().item() < 1e-5
