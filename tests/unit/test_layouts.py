"""Layout rules of every registered method, with exact ids (the reference's Coconut and CODI data code)."""
import dataclasses

import pytest

from pipeline.latent.collate import collate_aligned
from pipeline.latent.methods import IGNORE as X
from pipeline.latent.methods import MethodConfig, get_method, layout
from pipeline.latent.methods.coconut import step_targets as coconut_step_targets
from pipeline.latent.methods.codi import answer_start, slot_targets, step_spans
from tests.toy_records import RECORDS as TOY
from tests.toy_records import SEPARATOR
from tests.toy_records import SPECIAL as SP

pytestmark = pytest.mark.unit
S, L, E, EOS = 90, 91, 92, 2
RECORD = {"question_ids": [1, 10, 11], "step_ids": [[20, 21], [30], [40, 41], [50]], "answer_ids": [60, 61],
          # CODI's teacher text tokenised as one string: a BPE merged step 2's end and step 3's start into 70
          "teacher_cot_ids": [20, 21, 70, 41], "cot_ids": [20, 21, 70, 41, 50]}
SHORT = {"question_ids": [1, 12], "step_ids": [[20]], "answer_ids": [60, 62]}


def test_cot_and_nocot():
    ex = layout(RECORD, SP, MethodConfig("cot"))
    assert ex.input_ids == [1, 10, 11, 20, 21, 30, 40, 41, 50, 60, 61, EOS]
    assert ex.labels == [X, X, X, 20, 21, 30, 40, 41, 50, 60, 61, EOS]
    ex = layout(RECORD, SP, MethodConfig("nocot"))
    assert ex.input_ids == [1, 10, 11, 60, 61, EOS] and ex.labels == [X, X, X, 60, 61, EOS]


def test_coconut_stage_k_replaces_k_steps_with_c_latents_each():
    cfg = MethodConfig("coconut", c_thought=2, max_latent_stage=3)
    ex = layout(RECORD, SP, cfg, stage=2)
    assert ex.input_ids == [1, 10, 11, S, L, L, L, L, E, 40, 41, 50, 60, 61, EOS]
    assert ex.labels == [X] * 9 + [40, 41, 50, 60, 61, EOS]
    assert ex.n_latents == 4


def test_coconut_short_problem_still_gets_k_latents():
    ex = layout(SHORT, SP, MethodConfig("coconut", c_thought=2, max_latent_stage=3), stage=3)
    assert ex.input_ids == [1, 12, S] + [L] * 6 + [E, 60, 62, EOS]


def test_nothought_follows_coconuts_curriculum_with_nothing_in_place_of_the_steps():
    from pipeline.latent.methods import get_method

    cfg = MethodConfig("nothought", max_latent_stage=3)
    assert [layout(RECORD, SP, cfg, stage=k).input_ids for k in (0, 2, 4)] == [
        [1, 10, 11, 20, 21, 30, 40, 41, 50, 60, 61, EOS], [1, 10, 11, 40, 41, 50, 60, 61, EOS],
        [1, 10, 11, 60, 61, EOS]]
    assert layout(RECORD, SP, cfg, stage=2).labels == [X] * 3 + [40, 41, 50, 60, 61, EOS]
    assert layout(RECORD, SP, cfg, stage=2).n_latents == 0
    assert get_method("nothought").stage_for_epoch(3, 1, 2) == get_method("coconut").stage_for_epoch(3, 1, 2) == 2


def test_coconut_final_stage_all_steps_latent_padded_to_max():
    cfg = MethodConfig("coconut", c_thought=2, max_latent_stage=3)
    assert layout(RECORD, SP, cfg, stage=4).input_ids == [1, 10, 11, S] + [L] * 6 + [E, 60, 61, EOS]
    assert layout(SHORT, SP, cfg, stage=4).n_latents == 6
    unpadded = MethodConfig("coconut", c_thought=2, max_latent_stage=3, pad_latent_to_max=False)
    assert layout(SHORT, SP, unpadded, stage=4).n_latents == 2


def test_simcot_coconut_targets_overflow_merge_and_pseudo_thought():
    cfg = MethodConfig("coconut", c_thought=2, max_latent_stage=3, simcot=True)
    # final stage: groups 0, 1 own steps; steps 3.. merged into group 2
    assert layout(RECORD, SP, cfg, stage=4).step_targets == [[20, 21], [30], [40, 41, 50]]
    # stage 2: the two replaced steps
    assert layout(RECORD, SP, cfg, stage=2).step_targets == [[20, 21], [30]]
    # short problem at stage 3: one real step, then the pseudo thought (text after <end>)
    assert layout(SHORT, SP, cfg, stage=3).step_targets == [[20], [60, 62], [60, 62]]
    assert coconut_step_targets([[1], [2], [3], [4]], 2, 2, [9]) == [[1], [2, 3, 4]]


def test_progressive_train_keeps_every_latent_from_stage_0_and_explains_every_step():
    """The SIM-CoT authors' LLaMA variant (reference ``progressive_train``): the latent count is
    fixed, stages only remove steps from the text, the decoder slots always hold all the steps."""
    cfg = MethodConfig("coconut", c_thought=2, max_latent_stage=2, simcot=True, progressive_train=True)
    zero = layout(RECORD, SP, cfg, stage=0)
    assert zero.input_ids == [1, 10, 11, S, L, L, L, L, E, 20, 21, 30, 40, 41, 50, 60, 61, EOS]
    assert zero.labels == [X] * 9 + [20, 21, 30, 40, 41, 50, 60, 61, EOS]
    assert layout(RECORD, SP, cfg, stage=1).input_ids == [1, 10, 11, S, L, L, L, L, E, 30, 40, 41, 50, 60, 61, EOS]
    assert layout(RECORD, SP, cfg, stage=3).input_ids == [1, 10, 11, S, L, L, L, L, E, 60, 61, EOS]
    for stage in (0, 1, 3):         # group 0: step 1; steps 2.. merged into the last group
        assert layout(RECORD, SP, cfg, stage=stage).step_targets == [[20, 21], [30, 40, 41, 50]]
    assert layout(SHORT, SP, cfg, stage=0).step_targets == [[20], [20, 60, 62]]     # then the pseudo thought


def test_codi_student_teacher_and_distillation_columns():
    cfg = MethodConfig("codi", num_latent=3, simcot=True, step_targets="pieces")
    # answer_ids [60, 61] with prefix [60]: the answer text starts at index 1
    ex = layout(RECORD, SP, cfg, prefix_ids=[60])
    assert ex.input_ids == [1, 10, 11, 93, L, L, L, 94, 60, 61, EOS]
    assert ex.labels == [X] * 8 + [60, 61, EOS]
    assert ex.teacher_ids == [1, 10, 11, 20, 21, 70, 41, 60, 61, EOS]     # joined CoT, last step dropped
    assert ex.teacher_labels == [X, X, X, 20, 21, 70, 41, 60, 61, EOS]
    assert ex.input_ids[ex.distill_index] == 60 and ex.teacher_ids[ex.teacher_distill_index] == 60
    assert ex.step_targets == [[20, 21], [30], [40, 41], []]                 # 4 slots, last masked


def test_codi_step_targets_are_the_bracket_spans_of_the_teacher_ids():
    """The reference's get_steps: ``<<`` (or the merged `` <<``) to ``>>`` in the teacher's joined CoT,
    no separator; overflow merged into the last slot; with reference_quirks the whole teacher
    sequence is scanned up to its first EOS, so ``remove_eos: false`` leaves none."""
    record = TOY[0]                   # 4 steps; the teacher's joined CoT holds the first 3
    o, c, spaced, sep = SP["step_open"], SP["step_close"], SP["step_open_spaced"], SEPARATOR
    spans = [[o, 20, 21, c], [spaced, 30, c], [spaced, 40, 41, c]]
    assert layout(record, SP, MethodConfig("codi", num_latent=3, simcot=True), prefix_ids=[60]).step_targets == \
        spans + [[]]
    assert layout(record, SP, MethodConfig("codi", num_latent=1, simcot=True), prefix_ids=[60]).step_targets == \
        [spans[0], spans[1] + spans[2]]
    pieces = MethodConfig("codi", num_latent=3, simcot=True, step_targets="pieces")
    assert layout(record, SP, pieces, prefix_ids=[60]).step_targets == \
        [[o, 20, 21, c, sep], [o, 30, c, sep], [o, 40, 41, c, sep], []]
    for quirks in (False, True):
        cfg = MethodConfig("codi", num_latent=3, simcot=True, remove_eos=False, reference_quirks=quirks)
        assert layout(record, SP, cfg, prefix_ids=[60]).step_targets == ([[]] * 4 if quirks else spans + [[]])
    no_brackets = {k: v for k, v in SP.items() if not k.startswith("step_")}
    with pytest.raises(ValueError, match="no single token for '<<' or '>>'.*method.step_targets=pieces"):
        layout(record, no_brackets, MethodConfig("codi", num_latent=3, simcot=True), prefix_ids=[60])


def test_the_start_up_report_counts_the_steps_the_span_rule_finds():
    cfg = MethodConfig("codi", num_latent=3, simcot=True)
    assert "4 of 4 steps found in 3 train problems" in get_method(cfg.name).target_report(cfg, SP, TOY)
    merged = dict(TOY[0], teacher_cot_ids=[70] + TOY[0]["teacher_cot_ids"][1:])    # "<<" merged with text before
    report = get_method(cfg.name).target_report(cfg, SP, [merged])
    assert "2 of 3 steps found" in report and "1 problems have fewer spans than steps" in report
    assert get_method(cfg.name).target_report(MethodConfig("codi", simcot=True, step_targets="pieces"), SP, TOY) is None
    quirks = MethodConfig("codi", num_latent=3, simcot=True, remove_eos=False, reference_quirks=True)
    assert "0 of 4 steps found" in get_method(cfg.name).target_report(quirks, SP, TOY)     # as its layout: none


def test_the_span_rule_skips_what_is_not_a_closed_step():
    o, c = (SP["step_open"],), SP["step_close"]
    assert step_spans([5, 80, 6, 81, 7, 80, 8], o, c) == [[80, 6, 81]]            # never closed: skipped
    assert step_spans([80, 6, 2, 81, 80, 9, 81], o, c, stops=(2,)) == []          # a stop ends the scan
    assert step_spans([80, 80, 6, 81], o, c) == [[80, 80, 6, 81]]                  # the first opening wins


def test_codi_without_remove_eos_separates_the_parts_with_eos_as_the_reference_does():
    """CODI/train.py with remove_eos False: sources + EOS, cot + EOS, decoder <eot> EOS answer EOS,
    every decoder token labelled; test.py's prompt ends <eot> EOS."""
    from pipeline.inference.merged import prompt_for

    cfg = MethodConfig("codi", num_latent=3, simcot=True, remove_eos=False)
    ex = layout(RECORD, SP, cfg, prefix_ids=[60])
    assert ex.input_ids == [1, 10, 11, EOS, 93, L, L, L, 94, EOS, 60, 61, EOS]
    assert ex.labels == [X] * 9 + [EOS, 60, 61, EOS]
    assert ex.teacher_ids == [1, 10, 11, EOS, 20, 21, 70, 41, EOS, 60, 61, EOS]
    assert ex.teacher_labels == [X] * 4 + [20, 21, 70, 41, EOS, 60, 61, EOS]
    assert ex.input_ids[ex.distill_index] == 60 and ex.teacher_ids[ex.teacher_distill_index] == 60
    latent = {"method_config": dataclasses.asdict(cfg), "stage": 0, "special_tokens": SP}
    assert prompt_for(RECORD, latent) == ex.input_ids[:10]


def test_codi_teacher_cot_pieces_or_joined_and_shards_without_the_joined_ids():
    pieces = layout(RECORD, SP, MethodConfig("codi", num_latent=3, teacher_cot="pieces"), prefix_ids=[60])
    assert pieces.teacher_ids == [1, 10, 11, 20, 21, 30, 40, 41, 60, 61, EOS]
    assert pieces.teacher_ids[pieces.teacher_distill_index] == 60
    last = layout(RECORD, SP, MethodConfig("codi", num_latent=3, include_last_step=True), prefix_ids=[60])
    assert last.teacher_ids == [1, 10, 11, 20, 21, 70, 41, 50, 60, 61, EOS]
    old = {k: v for k, v in RECORD.items() if k not in ("teacher_cot_ids", "cot_ids")}
    with pytest.raises(ValueError, match="rebuild them with python -m data_prep build, or set method.teacher_cot"):
        layout(old, SP, MethodConfig("codi", num_latent=3), prefix_ids=[60])
    # the step decoder's targets do not follow the teacher's ids with step_targets=pieces
    joined = layout(RECORD, SP, MethodConfig("codi", num_latent=3, simcot=True, step_targets="pieces"),
                    prefix_ids=[60])
    assert joined.step_targets == [[20, 21], [30], [40, 41], []]


def test_codi_slots_merge_overflow_into_the_last_slot():
    assert slot_targets([[1], [2], [3], [4], [5]], 3) == [[1], [2], [3, 4, 5]]
    assert slot_targets([], 2) == [[], []]


def test_pause_keeps_the_codi_block_filled_with_one_token_and_labels_only_the_answer():
    ex = layout(RECORD, SP, MethodConfig("pause", num_latent=3))
    assert ex.input_ids == [1, 10, 11, 93, L, L, L, 94, 60, 61, EOS]
    assert ex.labels == [X] * 8 + [60, 61, EOS] and ex.n_latents == 3
    assert not ex.teacher_ids and not ex.step_targets


@pytest.mark.parametrize("cfg, stage", [
    (MethodConfig("cot"), 0), (MethodConfig("nocot"), 0), (MethodConfig("coconut", c_thought=2), 2),
    (MethodConfig("codi", num_latent=3), 0), (MethodConfig("pause", num_latent=4), 0),
    (MethodConfig("nothought"), 2)])
def test_the_evaluation_prompt_is_the_start_of_the_training_example(cfg, stage):
    """The evaluation prompt asks the method the training layout asks: they cannot drift apart."""
    from pipeline.inference.merged import prompt_for

    ex = layout(RECORD, SP, cfg, stage, prefix_ids=[60])
    latent_config = {"method_config": dataclasses.asdict(cfg), "stage": stage, "special_tokens": SP}
    prompt = prompt_for(RECORD, latent_config)
    assert ex.input_ids[:len(prompt)] == prompt and ex.labels[len(prompt) - 1] == X
    assert all(label != X for label in ex.labels[len(prompt):])


def test_every_registered_method_is_one_object_found_by_name():
    from pipeline.latent.methods import get_method, method_names

    assert set(method_names()) >= {"cot", "nocot", "coconut", "codi", "pause"}
    assert all(get_method(name).name == name for name in method_names())
    with pytest.raises(ValueError, match="expected one of"):
        MethodConfig("icot")


def test_answer_start_needs_the_prefix():
    assert answer_start([5, 6, 7], [5, 6]) == 2
    assert answer_start([5, 6, 8], [5, 6, 7]) == 2      # GPT-2 style: " 18" swallowed the space
    with pytest.raises(ValueError, match="answer prefix"):
        answer_start([9, 9], [5])


def test_collate_aligns_the_first_latent_column():
    cfg = MethodConfig("coconut", c_thought=1, max_latent_stage=2, simcot=True)
    batch = collate_aligned([layout(RECORD, SP, cfg, 2), layout(SHORT, SP, cfg, 2)], L, SP["pad"])
    ids = batch.input_ids.tolist()
    assert ids[0][:6] == [1, 10, 11, S, L, L] and ids[1][:6] == [0, 1, 12, S, L, L]
    assert batch.position_ids.tolist()[1][:4] == [0, 0, 1, 2]
    assert batch.attention_mask.tolist()[1][:2] == [0, 1]
    assert batch.first_latent == 4 and batch.n_latents == 2
    assert batch.step_lengths.tolist() == [[2, 1], [1, 2]]
    assert batch.step_ids.tolist()[1] == [[20, 0], [60, 62]]


def test_collate_refuses_mixed_latent_counts_without_a_span():
    cfg = MethodConfig("coconut", c_thought=1, max_latent_stage=3)
    with pytest.raises(ValueError, match="latent_span"):
        collate_aligned([layout(RECORD, SP, cfg, 1), layout(RECORD, SP, cfg, 2)], L, 0)
