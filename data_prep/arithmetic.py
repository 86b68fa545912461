"""Safe checking of calculator steps such as ``<<48/2=24>>`` (no ``eval``).

A step is ``<<expression=result>>``. :func:`evaluate` walks a parsed :mod:`ast` and allows
only numbers, ``+ - * / // % **`` and unary signs, so a data file can never run code.
Checks never drop a record: they return flag names that the manifest counts.
"""
from __future__ import annotations

import ast
import operator
import re

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
NUMBER = re.compile(r"-?(\d+(\.\d*)?|\.\d+)")
STEP = re.compile(r"<<([^<>]*)>>")


class UnsafeExpression(ValueError):
    """The text is not a plain arithmetic expression."""


def evaluate(expression: str) -> float:
    """Value of a plain arithmetic expression; commas and ``$`` are ignored as GSM8K writes them."""
    text = expression.replace(",", "").replace("$", "").strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise UnsafeExpression(f"not an arithmetic expression: {expression!r}") from err
    return float(_walk(tree.body))


def _walk(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise UnsafeExpression("exponent too large")  # bounded work for hostile input
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    raise UnsafeExpression(f"unsupported syntax: {type(node).__name__}")


def close_enough(value: float, written: str) -> bool:
    """True when ``value`` equals ``written`` up to the rounding its decimals imply (``10/3=3.33``)."""
    written = written.replace(",", "").replace("$", "").strip()
    try:
        target = float(written)
    except ValueError:
        return False
    decimals = len(written.split(".")[1]) if "." in written else 0
    return abs(value - target) <= 0.5 * 10 ** (-decimals) + 1e-9 * max(1.0, abs(target))


def step_result(step: str) -> str | None:
    """The written result of ``<<expr=result>>`` (text after the last ``=``), or None."""
    match = STEP.fullmatch(step.strip())
    if not match or "=" not in match.group(1):
        return None
    return match.group(1).rsplit("=", 1)[1]


def check_steps(steps: list[str], answer: str) -> list[str]:
    """Flags for a chain: ``step_unparsable``, ``step_result_wrong``, ``chain_misses_answer``, ``no_steps``."""
    if not steps:
        return ["no_steps"]
    flags: list[str] = []
    for step in steps:
        body = STEP.fullmatch(step.strip())
        expression, _, result = body.group(1).rpartition("=") if body else ("", "", "")
        try:
            value = evaluate(expression)
        except (UnsafeExpression, ZeroDivisionError, OverflowError):
            flags.append("step_unparsable")
            continue
        if not close_enough(value, result):
            flags.append("step_result_wrong")
    # The chain must reach the answer's value exactly: ``16.00`` reaches 16, ``6.75`` does not reach 7.
    last = step_result(steps[-1])
    if last is None or abs(_as_float(last) - _as_float(answer)) > 1e-9 * max(1.0, abs(_as_float(answer))):
        flags.append("chain_misses_answer")
    return sorted(set(flags))


def _as_float(text: str) -> float:
    try:
        return float(text.replace(",", "").replace("$", ""))
    except ValueError:
        return float("nan")


def normalise_answer(text: str) -> str:
    """Answer as the metrics compare it: commas removed, surrounding space stripped."""
    return text.replace(",", "").strip()


def format_number(value: float) -> str:
    """``51.0`` -> ``"51"``, ``2.5`` -> ``"2.5"``: how answer-only sets store float answers."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
