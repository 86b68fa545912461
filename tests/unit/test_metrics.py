import pytest

from pipeline.inference.scoring import after_last_hash, hash_match, last_number, number_match

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text, gold, by_hash, by_number", [
    ("<<2*3=6>>\n### 6", "6", True, True),
    ("### 1,000", "1000", True, True),
    ("### 18.0", "18", False, True),            # Coconut's string match is strict; CODI's float is not
    ("The answer is: 18", "18", False, True),    # no '#': the whole text is compared
    ("### -4", "-4", True, True),
    ("### 2.5", "2.5", True, True),
    ("### 7 apples", "7", False, True),
    ("# 3 # 4", "4", True, True),
    ("no number here", "5", False, False),
    ("The answer is: 1,234.50", "1234.5", False, True),
    ("### 12", "13", False, False),
])
def test_both_metrics_on_tricky_answers(text, gold, by_hash, by_number):
    assert hash_match(text, gold) is by_hash
    assert number_match(text, gold) is by_number


def test_parsers():
    assert after_last_hash("a # b, c #  1,234 ") == "1234"
    assert last_number("x 3 then -2.5.") == -2.5
    assert last_number("none") is None
