"""Allocation policies on worked examples with exact results, and a property run over all of them."""
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.money import minor_unit
from billing.policies import (
    BASE_PLUS_USAGE, EQUAL, FELL_BACK, IDLE, POLICIES, QUOTA, SEED_RATE, USAGE, MemberMonth, ModelUsage,
    PolicyParams, split_by_model, split_cost,
)

D = Decimal


def _member(member_id, prompt=0, completion=0, requests=0, *, model="qwen", days=30, rq=None, tq=None):
    usage = {model: ModelUsage(requests, prompt, completion)} if requests or prompt or completion else {}
    return MemberMonth(member_id, usage, request_quota=rq, token_quota=tq, active_days=days)


def test_usage_weights_prompt_and_completion():
    members = [_member(1, prompt=1000, completion=1000), _member(2, prompt=3000, completion=0)]
    split = split_cost(D("3000.00"), members, PolicyParams(kind=USAGE, completion_weight=D(2)), "CNY")
    # weights 1000 + 2×1000 = 3000 and 3000: half each
    assert split.amounts == {1: D("1500.00"), 2: D("1500.00")} and split.policy == USAGE
    assert "completion tokens 2" in split.explanation


def test_usage_with_model_weights():
    members = [MemberMonth(1, {"big": ModelUsage(1, 100, 0)}), MemberMonth(2, {"small": ModelUsage(1, 100, 0)})]
    params = PolicyParams(kind=USAGE, model_weights={"big": D(3)})
    assert split_cost(D("100"), members, params, "JPY").amounts == {1: D("75"), 2: D("25")}


def test_quota_policy_and_an_unlimited_member_weighs_as_the_largest_quota():
    members = [_member(1, tq=1000), _member(2, tq=3000), _member(3, tq=None)]
    split = split_cost(D("7.000"), members, PolicyParams(kind=QUOTA), "KWD")
    assert split.amounts == {1: D("1.000"), 2: D("3.000"), 3: D("3.000")}


def test_seed_rate_charges_use_at_cost_over_quota_and_shows_idle_capacity():
    # The old team script: price per request = 3000 / (3 × 100 requests) = 10 CNY.
    members = [_member(1, 10, 10, 30, rq=100), _member(2, 5, 5, 15, rq=100), _member(3, rq=100)]
    split = split_cost(D("3000.00"), members, PolicyParams(kind=SEED_RATE, quota_unit="requests"), "CNY")
    assert split.amounts == {1: D("300.00"), 2: D("150.00"), 3: D("0.00")}
    assert split.unallocated == split.idle == D("2550.00")  # 255 unused requests × 10
    assert "costs 10 CNY" in split.explanation and "2550.00 CNY" in split.explanation
    assert split.allocated + split.unallocated == D("3000.00")


def test_seed_rate_idle_capacity_charged_to_the_named_payer():
    members = [_member(1, 10, 10, 30, rq=100), _member(2, 5, 5, 15, rq=100), _member(3, rq=100)]
    params = PolicyParams(kind=SEED_RATE, quota_unit="requests", idle_payer_id=3)
    split = split_cost(D("3000.00"), members, params, "CNY")
    assert split.amounts == {1: D("300.00"), 2: D("150.00"), 3: D("2550.00")}
    assert (split.idle, split.unallocated) == (D("2550.00"), D("0.00"))


def test_seed_rate_past_the_total_quota_splits_everything_by_use():
    members = [_member(1, 1, 1, 150, rq=100), _member(2, 1, 1, 50, rq=100)]
    split = split_cost(D("100.00"), members, PolicyParams(kind=SEED_RATE, quota_unit="requests"), "CNY")
    assert split.amounts == {1: D("75.00"), 2: D("25.00")} and split.unallocated == D("0.00")


def test_equal_is_pro_rata_by_active_days():
    members = [_member(1, days=30), _member(2, days=15), _member(3, days=0)]
    split = split_cost(D("90.00"), members, PolicyParams(kind=EQUAL), "USD")
    assert split.amounts == {1: D("60.00"), 2: D("30.00"), 3: D("0.00")}


def test_base_plus_usage():
    members = [_member(1, prompt=100, days=30), _member(2, days=30)]
    split = split_cost(D("100.00"), members, PolicyParams(kind=BASE_PLUS_USAGE, base_share=D("0.4")), "EUR")
    # 40 split equally (20 + 20), 60 by usage (all member 1)
    assert split.amounts == {1: D("80.00"), 2: D("20.00")}
    assert split.explanation.startswith("40% of the month's cost")


@pytest.mark.parametrize("kind", [USAGE, QUOTA, SEED_RATE, BASE_PLUS_USAGE])
def test_nobody_used_anything_falls_back_to_equal_and_says_so(kind):
    members = [_member(1), _member(2)]  # no usage, no quotas
    split = split_cost(D("10.00"), members, PolicyParams(kind=kind), "CNY")
    assert split.amounts == {1: D("5.00"), 2: D("5.00")}
    assert split.fell_back and split.explanation == FELL_BACK


def test_split_by_model_sums_to_the_members_amount():
    member = MemberMonth(1, {"a": ModelUsage(3, 100, 200), "b": ModelUsage(1, 50, 0)})
    parts = split_by_model(D("10.00"), member, PolicyParams(), "CNY")
    assert parts == {"a": D("8.57"), "b": D("1.43")} and sum(parts.values()) == D("10.00")


def _exact_shares(total, members, params):
    """The exact (unrounded) amount of each member, computed independently of the policies' code."""
    t = Fraction(total)
    days = {m.member_id: Fraction(m.active_days) for m in members}
    use = {m.member_id: Fraction(sum(u.prompt_tokens * params.prompt_weight + u.completion_tokens
                                     * params.completion_weight for u in m.by_model.values())) for m in members}

    def by(weights):
        s = sum(weights.values())
        return {k: t * w / s for k, w in weights.items()} if s else None

    if params.kind == EQUAL:
        return by(days)
    if params.kind == USAGE:
        return by(use) or by(days)
    if params.kind == BASE_PLUS_USAGE:
        if not any(use.values()):
            return by(days)
        share = Fraction(params.base_share)
        d, u = by(days), by(use)
        return {k: share * d[k] + (1 - share) * u[k] for k in d}
    return None  # quota and seed_rate: checked by their sums only


members_strategy = st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 1000), st.integers(1, 10**7),
              st.integers(1, 31)),
    min_size=1, max_size=200)


@settings(max_examples=150, deadline=None)
@given(rows=members_strategy, kind=st.sampled_from(POLICIES), currency=st.sampled_from(["JPY", "CNY", "KWD"]),
       units=st.integers(0, 10**8), completion_weight=st.sampled_from([D(1), D(2), D("1.5")]))
def test_every_policy_allocates_exactly_and_within_one_unit(rows, kind, currency, units, completion_weight):
    members = [MemberMonth(i, {"m": ModelUsage(r, p, c)} if (p or c or r) else {}, request_quota=q,
                           token_quota=q, active_days=days) for i, (p, c, r, q, days) in enumerate(rows)]
    params = PolicyParams(kind=kind, completion_weight=completion_weight, quota_unit="tokens")
    total = D(units) * minor_unit(currency)
    split = split_cost(total, members, params, currency)
    assert split.allocated + split.unallocated == total
    assert IDLE not in split.amounts and set(split.amounts) == {m.member_id for m in members}
    exact = _exact_shares(total, members, params)
    if exact is not None:
        for member_id, amount in split.amounts.items():
            assert abs(Fraction(amount) - exact[member_id]) < Fraction(minor_unit(currency))
