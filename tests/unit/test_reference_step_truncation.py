"""``method.reference_step_truncation``: CODI + SIM-CoT's released step targets, cut in every slot to
row 0's width by ``dedup_trailing_pads`` (SPEC 8.6), emulated on this pipeline's targets."""
import random

import pytest
import torch

from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import MethodConfig, layout
from pipeline.latent.reasoner import LatentReasoner
from pipeline.latent.reference_quirks import row0_width
from tests.tiny_models import tiny_llama
from tests.toy_records import RECORDS
from tests.toy_records import SPECIAL as SP

pytestmark = pytest.mark.unit
PAD, EOT = 0, 9


def reference_dedup_inside_the_loop(rows: list[list[int]]) -> list[list[int]]:
    """CODI/src/model.py: ``dedup_trailing_pads`` called after each row is appended."""
    kept = []
    for row in rows:
        kept.append(row)
        width = len(kept[0])
        while width > 1 and all(r[width - 2] == PAD for r in kept):
            width -= 1
        kept = [r[:width] for r in kept]
    return kept


def test_the_labels_kept_are_the_references_for_any_step_lengths():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([0, 1, 2, 3, 5, 8]) for _ in range(rng.randint(1, 5))]
        width = 1 + max(lengths) + 1
        rows = [[rng.randint(10, 99) for _ in range(n)] + [EOT] + [PAD] * (width - n - 1) if n else [PAD] * width
                for n in lengths]
        expected = [sum(t != PAD for t in row) for row in reference_dedup_inside_the_loop(rows)]
        ours = row0_width(torch.tensor([lengths]).T).flatten().tolist()        # [B, 1 slot]
        assert [min(n + 1, w) if n else 0 for n, w in zip(lengths, ours)] == expected, lengths


def test_spec_examples():
    # rows [1, 2, P, P, P] then [1, 2, 3, 4, P] keep [1, 2, 3]; a masked row 0 leaves one label
    assert row0_width(torch.tensor([[1], [3]])).flatten().tolist() == [2, 3]
    assert row0_width(torch.tensor([[0], [3]])).flatten().tolist() == [1, 1]


def _loss(records, truncate):
    cfg = MethodConfig("codi", num_latent=3, simcot=True)
    batch = collate_aligned([layout(r, SP, cfg, 0, prefix_ids=[60, 61]) for r in records], SP["latent"], 0)
    model = LatentReasoner(tiny_llama(100, seed=4), cfg.replace(reference_step_truncation=truncate),
                           eos_id=SP["eos"]).eval()
    with torch.no_grad():
        return model(batch)["step_ce"].item()


def test_the_switch_changes_the_loss_only_where_a_row_outgrows_row_0():
    longest_first = [RECORDS[2], RECORDS[2]]             # equal steps: nothing is cut
    assert _loss(longest_first, True) == pytest.approx(_loss(longest_first, False), abs=1e-6)
    shortest_first = [RECORDS[1], RECORDS[0], RECORDS[2]]   # row 0's single step is shorter: the others lose labels
    assert abs(_loss(shortest_first, True) - _loss(shortest_first, False)) > 1e-3
