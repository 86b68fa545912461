import pytest

from data_prep.arithmetic import UnsafeExpression, check_steps, close_enough, evaluate, format_number

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("expression, value", [
    ("48/2", 24), ("5000*(2.5/100)", 125), ("2/.5", 4), ("-3+10", 7), ("1,000*2", 2000), ("$5*3", 15), ("2**3", 8),
])
def test_evaluate_plain_arithmetic(expression, value):
    assert evaluate(expression) == pytest.approx(value)


@pytest.mark.parametrize("expression", ["__import__('os')", "x+1", "[1][0]", "2**1000", "open('f')", "1 if 1 else 2"])
def test_evaluate_refuses_anything_but_arithmetic(expression):
    with pytest.raises(UnsafeExpression):
        evaluate(expression)


def test_close_enough_respects_the_written_rounding():
    assert close_enough(10 / 3, "3.33")
    assert close_enough(16, "16.00")
    assert not close_enough(6.75, "7.5")


def test_check_steps_flags_without_dropping():
    assert check_steps(["<<16-3-4=9>>", "<<9*2=18>>"], "18") == []
    assert check_steps(["<<2*3=7>>"], "7") == ["step_result_wrong"]
    assert check_steps(["<<2*3=6>>"], "18") == ["chain_misses_answer"]
    assert check_steps(["<<54/8=6.75>>"], "7") == ["chain_misses_answer"]   # close is not equal
    assert check_steps(["<<4*4=16.00>>"], "16") == []
    assert check_steps([], "5") == ["no_steps"]
    assert check_steps(["<<a+b=3>>"], "3") == ["step_unparsable"]


def test_format_number():
    assert format_number(51.0) == "51"
    assert format_number(-9867630.0) == "-9867630"
    assert format_number(2.5) == "2.5"
