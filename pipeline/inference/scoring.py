"""Both published answer metrics.

- Coconut's: the text after the last ``#``, commas removed, stripped, compared as a string
  (so ``18.0`` != ``18``).
- CODI's: the last number in the text (commas removed), compared as a float (``18.0`` == ``18``).
"""
from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+\.?\d*")


def after_last_hash(text: str) -> str:
    return text.rsplit("#", 1)[-1].replace(",", "").strip()


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:          # "-" alone or "1." is still a float; anything else is no number
        return None


def hash_match(text: str, gold: str) -> bool:
    return after_last_hash(text) == gold.replace(",", "").strip()


def number_match(text: str, gold: str) -> bool:
    value = last_number(text)
    try:
        return value is not None and value == float(gold.replace(",", ""))
    except ValueError:
        return False
