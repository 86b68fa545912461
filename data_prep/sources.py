"""Readers and parsers that turn each raw format into :class:`Problem` records or reasoned rejects.

    records, parser = open_source(parse_source_spec("gsm8k-aug:data/train.txt"))
    parsed = [parser(record) for record in records]      # what read_source gives

A source is named on the command line as ``KIND:PATH[@SPLIT]``; a hub dataset as
``hub:ID[:HUB_SPLIT][@SPLIT]`` (``HUB_SPLIT`` the hub's split expression, e.g. ``train+test``;
``SPLIT`` ours, by default the hub split's own name). ``ID`` may be a local directory holding a
copy of the hub repository's files.
A source's reader yields one raw record per input record (a line's text, a JSON object, or why it
cannot be read) and its parser one :class:`Parsed` per raw record, so ``read == accepted +
rejected`` holds by construction: nothing is dropped silently. Reading and parsing are apart so
that a build reads in one process and parses in its workers.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .arithmetic import NUMBER, STEP, check_steps, format_number, normalise_answer

SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "dev": "valid",
                 "val": "valid", "test": "test"}


@dataclass
class Problem:
    """One parsed problem before tokenisation."""
    question: str
    steps: list[str]
    answer: str
    flags: list[str] = field(default_factory=list)


@dataclass
class Parsed:
    """What a reader yields for one input record: a problem, or the reason it was rejected."""
    line: int
    problem: Problem | None = None
    reject: str | None = None


class RecordError(ValueError):
    """A malformed record; the message is the reject reason."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str
    split: str
    hub_split: str = ""        # hub sources: the split expression to load (e.g. train+test)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.path}"


def parse_source_spec(spec: str) -> SourceSpec:
    """``gsm8k-aug:data/valid.txt`` -> kind, path, split (from ``@split`` or the file name)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in FORMATS:
        raise ValueError(f"--source {spec!r}: expected KIND:PATH with KIND one of {', '.join(sorted(FORMATS))}")
    if kind == "hub":
        return _hub_spec(spec, rest)
    path, _, split = rest.partition("@")
    if not split:
        split = _split_from_name(path, default="test" if kind in ANSWER_ONLY else None)
    if split not in SPLIT_ALIASES.values():
        raise ValueError(f"--source {spec!r}: split {split!r} is not train, valid or test "
                         "(add @train, @valid or @test)")
    return SourceSpec(kind, path, split)


def _hub_spec(spec: str, rest: str) -> SourceSpec:
    rest, _, ours = rest.partition("@")
    dataset_id, hub_split = rest, "train"
    if ":" in rest and not os.path.isdir(rest):
        dataset_id, _, hub_split = rest.rpartition(":")
        hub_split = hub_split or "train"
    ours = ours or SPLIT_ALIASES.get(hub_split, "")
    if ours not in SPLIT_ALIASES.values():
        raise ValueError(f"--source {spec!r}: hub split {hub_split!r} is not train, valid or test; name the split it "
                         "fills with @train, @valid or @test (e.g. hub:ChilleD/SVAMP:train+test@test)")
    return SourceSpec("hub", dataset_id, ours, "validation" if hub_split == "valid" else hub_split)


def _split_from_name(path: str, default: str | None) -> str:
    stem = os.path.basename(path).lower()
    for word in re.split(r"[^a-z]+", stem):
        if word in SPLIT_ALIASES:
            return SPLIT_ALIASES[word]
    if default:
        return default
    raise ValueError(f"{path}: cannot tell the split from the file name; append @train, @valid or @test")


# ---------------------------------------------------------------- field-level rules
def _require_text(obj: dict, key: str) -> str:
    if key not in obj:
        raise RecordError(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise RecordError(f"empty {key!r}")
    return value


def _numeric_answer(text: str) -> str:
    answer = normalise_answer(text)
    if not answer:
        raise RecordError("empty answer")
    if not NUMBER.fullmatch(answer):
        raise RecordError(f"non-numeric answer {answer!r}")
    return answer


def _answer_after_marker(text: str) -> tuple[str, str]:
    """Split ``solution #### answer``; exactly one marker is allowed."""
    count = text.count("####")
    if count == 0:
        raise RecordError("no '####' answer marker")
    if count > 1:
        raise RecordError(f"{count} '####' answer markers, expected one")
    body, _, answer = text.partition("####")
    return body, _numeric_answer(answer)


def _check_brackets(text: str) -> None:
    depth = 0
    for match in re.finditer(r"<<|>>", text):
        depth += 1 if match.group() == "<<" else -1
        if depth not in (0, 1):
            raise RecordError("unbalanced '<<' / '>>'")
    if depth:
        raise RecordError("unbalanced '<<' / '>>'")


def _checked(question: str, steps: list[str], answer: str) -> Problem:
    return Problem(question, steps, answer, check_steps(steps, answer))


# ---------------------------------------------------------------- record parsers
def parse_gsm8k(obj: object) -> Problem:
    """Original GSM8K: the ``<<expr=result>>`` annotations of the solution become the steps."""
    obj = _object(obj)
    question = _require_text(obj, "question")
    body, answer = _answer_after_marker(_require_text(obj, "answer"))
    _check_brackets(body)
    return _checked(question, [f"<<{m}>>" for m in STEP.findall(body)], answer)


def parse_gsm8k_aug(line: str) -> Problem:
    """GSM8k-Aug: ``question||<<e1>> <<e2>> #### answer``."""
    if "||" not in line:
        raise RecordError("no '||' between question and steps")
    question, _, rest = line.partition("||")
    if not question.strip():
        raise RecordError("empty question")
    chain, answer = _answer_after_marker(rest)
    _check_brackets(chain)
    steps = chain.split()
    for step in steps:
        if not STEP.fullmatch(step) or "=" not in step:
            raise RecordError(f"step {step!r} is not of the form <<expression=result>>")
    return _checked(question, steps, answer)


def parse_gsm8k_aug_nl(obj: object) -> Problem:
    """GSM8k-Aug-NL ``{question, cot, answer}``: natural-language steps. The CoT is split into
    sentences on ". " as CODI does (each step keeps its full stop); there is no arithmetic to check."""
    obj = _object(obj)
    question, cot = _require_text(obj, "question"), _require_text(obj, "cot")
    if obj.get("answer") is None:
        raise RecordError("missing field 'answer'")
    sentences = (s.strip().removesuffix(".").strip() for s in cot.strip().split(". "))
    return Problem(question, [s + "." for s in sentences if s], _numeric_answer(str(obj["answer"])))


def parse_coconut(obj: object) -> Problem:
    """Coconut JSON ``{question, steps, answer}``; its ``[""]`` for an empty chain means no step."""
    obj = _object(obj)
    question = _require_text(obj, "question")
    steps = obj.get("steps")
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise RecordError("field 'steps' must be a list of strings")
    steps = [s for s in steps if s.strip()]
    for step in steps:
        _check_brackets(step)
    answer = _numeric_answer(str(_require_text(obj, "answer")))
    return _checked(question, steps, answer)


def parse_gsm_hard(obj: object) -> Problem:
    obj = _object(obj)
    return Problem(_require_text(obj, "input"), [], _float_answer(obj, "target"))


def parse_svamp(obj: object) -> Problem:
    obj = _object(obj)
    question = f"{_require_text(obj, 'Body').strip()} {_require_text(obj, 'Question').strip()}"
    return Problem(question, [], _float_answer(obj, "Answer"))


def parse_multiarith(obj: object) -> Problem:
    """Both layouts: the full ``MultiArith.json`` and the 420/180 split (``question``/``final_ans``)."""
    obj = _object(obj)
    if "sQuestion" in obj:
        solutions = obj.get("lSolutions")
        if not isinstance(solutions, list) or not solutions:
            raise RecordError("missing field 'lSolutions'")
        return Problem(_require_text(obj, "sQuestion").strip(), [], _float_answer({"a": solutions[0]}, "a"))
    return Problem(_require_text(obj, "question").strip(), [], _numeric_answer(_require_text(obj, "final_ans")))


def _float_answer(obj: dict, key: str) -> str:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            return _numeric_answer(value)
        raise RecordError(f"field {key!r} is not a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise RecordError(f"field {key!r} is not finite")
    return format_number(value)


def _object(obj: object) -> dict:
    if not isinstance(obj, dict):
        raise RecordError(f"record is {type(obj).__name__}, expected a JSON object")
    return obj


# ---------------------------------------------------------------- file readers
RawRecord = tuple  # (line or item number, the record's text or object, why it cannot be read or None)


@dataclass(frozen=True)
class RecordParser:
    """One raw record -> its :class:`Parsed`. Made of module-level functions only, so that it
    pickles: a build's worker processes parse the records the reading process hands them."""
    parse: Callable[[object], Problem]
    json_text: bool = False        # the record is a JSON line's text

    def __call__(self, record: RawRecord) -> Parsed:
        number, payload, error = record
        if error:
            return Parsed(number, reject=error)
        if self.json_text:
            try:
                payload = json.loads(payload)
            except json.JSONDecodeError as err:
                return Parsed(number, reject=f"bad JSON: {err.msg} (column {err.colno})")
        try:
            return Parsed(number, problem=self.parse(payload))
        except RecordError as err:
            return Parsed(number, reject=str(err))


def text_lines(path: str) -> Iterator[RawRecord]:
    """(line number, text, error) for each non-empty line; bytes that are not UTF-8 are an error."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as err:
                yield number, None, f"not UTF-8 ({err.reason} at byte {err.start})"


def json_list_items(path: str) -> Iterator[RawRecord]:
    """A whole-file JSON list; the number is the 1-based item index (JSON gives no per-item lines)."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        items = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        yield 1, None, f"not UTF-8 ({err.reason} at byte {err.start})"
        return
    except json.JSONDecodeError as err:
        yield err.lineno, None, f"bad JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        return
    if not isinstance(items, list):
        yield 1, None, f"file holds a JSON {type(items).__name__}, expected a list of records"
        return
    for index, obj in enumerate(items, start=1):
        yield index, obj, None


def hub_rows(dataset_id: str, split: str) -> tuple[Iterator[RawRecord], RecordParser]:
    """A hub dataset (or a local copy of its files) by its columns: GSM8K (``question, answer``),
    Coconut (``steps``), iCoT (``cot``; without ``<<..>>``: GSM8k-Aug-NL's sentences), and the
    evaluation sets as the references load them: GSM-Hard ``juyoung-trl/gsm-hard``
    (``instruction, response``), SVAMP ``ChilleD/SVAMP`` (``question_concat, Answer``), MultiArith
    ``ChilleD/MultiArith`` (``question, final_ans``)."""
    import datasets  # imported here: only users with a network (or a local copy) need it

    try:
        table = datasets.load_dataset(dataset_id, split=split)
    except ValueError:  # datasets asks for a config name, as openai/gsm8k does
        table = datasets.load_dataset(dataset_id, "main", split=split)
    rows = ((index, row, None) for index, row in enumerate(table, start=1))
    return rows, RecordParser(hub_parser(set(table.column_names)))


def hub_parser(columns: set[str]) -> Callable:
    """The parser of a hub table with these columns."""
    if "steps" in columns:
        return parse_coconut
    if "cot" in columns:
        return _parse_icot_row
    if {"instruction", "response"} <= columns:
        return _parse_gsm_hard_row
    if {"question_concat", "Answer"} <= columns:
        return _parse_svamp_row
    if "final_ans" in columns:
        return parse_multiarith
    return parse_gsm8k


def _parse_icot_row(row: dict) -> Problem:
    if "<<" not in str(row.get("cot")):          # GSM8k-Aug-NL: sentences, no <<..>>
        return parse_gsm8k_aug_nl(row)
    return parse_gsm8k_aug(f"{row.get('question', '')}||{row.get('cot', '')} #### {row.get('answer', '')}")


def _parse_gsm_hard_row(row: dict) -> Problem:
    return parse_gsm_hard({"input": row.get("instruction"), "target": row.get("response")})


def _parse_svamp_row(row: dict) -> Problem:
    return Problem(_require_text(_object(row), "question_concat").strip(), [], _float_answer(row, "Answer"))


FORMATS: dict[str, tuple[Callable[[str], Iterator[RawRecord]], RecordParser] | None] = {
    "gsm8k": (text_lines, RecordParser(parse_gsm8k, json_text=True)),
    "gsm8k-aug": (text_lines, RecordParser(parse_gsm8k_aug)),
    "gsm8k-aug-nl": (text_lines, RecordParser(parse_gsm8k_aug_nl, json_text=True)),
    "coconut": (json_list_items, RecordParser(parse_coconut)),
    "gsm-hard": (text_lines, RecordParser(parse_gsm_hard, json_text=True)),
    "svamp": (json_list_items, RecordParser(parse_svamp)),
    "multiarith": (json_list_items, RecordParser(parse_multiarith)),
    "hub": None,  # its parser depends on the table's columns: hub_rows
}
ANSWER_ONLY = {"gsm-hard", "svamp", "multiarith"}


def open_source(spec: SourceSpec) -> tuple[Iterator[RawRecord], RecordParser]:
    """The source's raw records, read lazily, and the parser that turns each into a :class:`Parsed`."""
    if spec.kind == "hub":
        return hub_rows(spec.path, spec.hub_split or spec.split)
    if not os.path.isfile(spec.path):
        raise FileNotFoundError(f"--source {spec.name}: no such file")
    read, parser = FORMATS[spec.kind]
    return read(spec.path), parser


def read_source(spec: SourceSpec) -> Iterator[Parsed]:
    records, parser = open_source(spec)
    return map(parser, records)
