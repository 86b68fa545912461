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
    normalise_question: bool = False  # CODI's evaluation: question.strip().replace("  ", " "), here on every split

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def defaults_for(recorded: dict) -> dict:
        """A manifest's or model's recorded templates with the options added since filled with their
        defaults, so records made before an option existed compare equal to its default."""
        return {**asdict(Templates()), **recorded}

    def question_text(self, question: str) -> str:
        """The question as it is tokenised: CODI's test-time normalisation (336 of 1,319 GSM8K test
        questions contain a double space), applied to train and test alike when asked for."""
        return question.strip().replace("  ", " ") if self.normalise_question else question

    def cot_text(self, question: str, steps: list[str], answer: str) -> str:
        return (question + self.question_suffix + "".join(s + self.step_separator for s in steps)
                + self.answer_prefix + answer)


def tokenize_joined_cots(tok, templates: Templates, steps: list[list[str]]) -> tuple[list[list[int]], list[list[int]]]:
    """CODI's teacher text, as the reference tokenises it: the steps joined by the separator (no
    separator after the last), one string -> (teacher_cot_ids: all steps but the last, cot_ids: all)."""
    sep = templates.step_separator
    return (encode(tok, [sep.join(chain[:-1]) for chain in steps], special=False),
            encode(tok, [sep.join(chain) for chain in steps], special=False))


def tokenize_problems(tok, templates: Templates, questions: list[str], steps: list[list[str]],
                      answers: list[str]) -> tuple[list[list[int]], list[list[list[int]]], list[list[int]]]:
    """Batched tokenisation of every piece; returns question_ids, step_ids, answer_ids (no EOS)."""
    question_ids = encode(tok, [q + templates.question_suffix for q in questions], special=True)
    flat_ids = encode(tok, [s + templates.step_separator for chain in steps for s in chain], special=False)
    step_ids, cursor = [], 0
    for chain in steps:
        step_ids.append(flat_ids[cursor:cursor + len(chain)])
        cursor += len(chain)
    answer_ids = encode(tok, [templates.answer_prefix + a for a in answers], special=False)
    return question_ids, step_ids, answer_ids


def encode(tok, texts: list[str], special: bool) -> list[list[int]]:
    """``tok(texts, add_special_tokens=special)["input_ids"]``; a fast tokenizer is called through
    its Rust backend, as that call does, without the wrapper's per-text conversion to Python
    dicts (most of the build's tokenisation time; benchmark P7) and without the character
    offsets of each token, which nothing here reads."""
    if not texts:
        return []
    backend = direct_backend(tok)
    if backend is None:
        return tok(texts, add_special_tokens=special)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=special)]


def direct_backend(tok):
    """A fast tokenizer's Rust backend where calling it gives what ``tok(...)`` gives (no
    truncation or padding set on it), else None."""
    backend = getattr(tok, "_tokenizer", None) if getattr(tok, "is_fast", False) else None
    return None if backend is None or backend.truncation or backend.padding else backend
