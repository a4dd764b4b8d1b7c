"""billing.money: minor units from Babel, exact largest-remainder splits (no database)."""
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.money import allocate, format_money, minor_unit, quantize


@pytest.mark.parametrize(("currency", "unit"), [("JPY", "1"), ("CNY", "0.01"), ("USD", "0.01"), ("EUR", "0.01"),
                                                ("KWD", "0.001")])
def test_minor_units_come_from_the_currency(currency, unit):
    assert minor_unit(currency) == Decimal(unit)


def test_quantize_rounds_half_up_once():
    assert quantize(Decimal("2.675"), "CNY") == Decimal("2.68")
    assert quantize(Decimal("2.5"), "JPY") == Decimal("3")


def test_eight_over_three_equal_members():
    assert allocate(Decimal("8.00"), {1: 1, 2: 1, 3: 1}, "USD") == {1: Decimal("2.67"), 2: Decimal("2.67"),
                                                                     3: Decimal("2.66")}


def test_ties_go_to_the_smaller_key_and_reruns_agree():
    first = allocate(Decimal("10"), {7: 1, 3: 1, 5: 1}, "JPY")
    assert first == {3: Decimal("4"), 5: Decimal("3"), 7: Decimal("3")}
    assert allocate(Decimal("10"), {5: 1, 7: 1, 3: 1}, "JPY") == first


def test_no_weight_splits_nothing_and_bad_input_is_refused():
    assert allocate(Decimal("5.00"), {1: 0, 2: 0}, "CNY") == {1: Decimal("0.00"), 2: Decimal("0.00")}
    with pytest.raises(ValueError):
        allocate(Decimal("5.001"), {1: 1}, "CNY")  # not in minor units
    with pytest.raises(ValueError):
        allocate(Decimal("5.00"), {1: -1, 2: 2}, "CNY")


def test_formatting_is_for_people():
    assert format_money(Decimal("1234.5"), "CNY", "zh_CN") == "¥1,234.50"
    assert format_money(Decimal("1234"), "JPY", "en") == "¥1,234"


@settings(max_examples=200, deadline=None)
@given(
    currency=st.sampled_from(["JPY", "CNY", "KWD"]),
    units=st.integers(min_value=0, max_value=10**9),
    weights=st.lists(st.integers(min_value=0, max_value=10**7), min_size=1, max_size=200),
)
def test_parts_sum_to_the_total_and_stay_within_one_unit_of_the_exact_share(currency, units, weights):
    unit = minor_unit(currency)
    total = Decimal(units) * unit
    parts = allocate(total, dict(enumerate(weights)), currency)
    assert sum(parts.values()) == (total if any(weights) else 0)
    if any(weights):
        for k, w in enumerate(weights):
            exact = Fraction(total) * w / sum(weights)
            assert abs(Fraction(parts[k]) - exact) < Fraction(unit)
