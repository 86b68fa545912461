"""How a problem is laid out as text, and its tokenisation into the shard fields.

The explicit CoT text is ``question + question_suffix + Σ(step + step_separator) + answer_prefix
+ answer``; each piece is tokenised on its own (BOS only on the question, by the tokenizer's own
rule), exactly as Coconut's ``get_dataset`` does. Where a BPE merges across a piece boundary
(LLaMA-3's ``>>\\n``), the ids differ from tokenising the whole text; see README "Tokenisation".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Templates:
    question_suffix: str = "\n"
    step_separator: str = "\n"
    answer_prefix: str = "### "      # Coconut; CODI uses "The answer is: "

    def as_dict(self) -> dict:
        return asdict(self)

    def cot_text(self, question: str, steps: list[str], answer: str) -> str:
        return (question + self.question_suffix + "".join(s + self.step_separator for s in steps)
                + self.answer_prefix + answer)


def tokenize_problems(tok, templates: Templates, questions: list[str], steps: list[list[str]],
                      answers: list[str]) -> tuple[list[list[int]], list[list[list[int]]], list[list[int]]]:
    """Batched tokenisation of every piece; returns question_ids, step_ids, answer_ids (no EOS)."""
    question_ids = tok([q + templates.question_suffix for q in questions], add_special_tokens=True)["input_ids"]
    flat_steps = [s + templates.step_separator for chain in steps for s in chain]
    flat_ids = tok(flat_steps, add_special_tokens=False)["input_ids"] if flat_steps else []
    step_ids, cursor = [], 0
    for chain in steps:
        step_ids.append(flat_ids[cursor:cursor + len(chain)])
        cursor += len(chain)
    answer_ids = tok([templates.answer_prefix + a for a in answers], add_special_tokens=False)["input_ids"]
    return question_ids, step_ids, answer_ids
