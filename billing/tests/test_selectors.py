"""Selectors: the aggregation in SQL (query budget), month edges, the month so far, reconciliation."""
import zoneinfo
from datetime import date, datetime
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError

from billing.models import InvoiceLine
from billing.selectors import cost_report, period_billed_members, period_reconciliation, period_usage
from billing.services import billing_policy_update, period_close
from billing.services.rollups import usage_days_roll
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.periods import period_start_for
from tenants.tests.factories import TeamFactory

D = Decimal
UTC = zoneinfo.ZoneInfo("UTC")
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
NOV = date(2026, 11, 1)


def _row_at(member, instant, **kwargs):
    """A usage row as the gateway writes it: period_start is the month the request was admitted in."""
    return usage(member, period_start_for(member.team.timezone, instant), started_at=instant, **kwargs)


@pytest.mark.django_db
def test_aggregation_is_three_queries_whatever_the_rows_and_members(django_assert_max_num_queries):
    team = TeamFactory()
    members = [MemberJoinedFactory(team=team) for _ in range(6)]
    for i, member in enumerate(members):
        for model in ("a", "b"):
            for _ in range(i + 1):
                usage(member, NOV, prompt=10, completion=5, model=model)
    with django_assert_max_num_queries(3):
        billed = period_billed_members(team=team, start=NOV)
    assert len(billed) == 6
    assert billed[5].month.by_model["a"].requests == 6 and billed[5].month.by_model["b"].prompt_tokens == 60
    with django_assert_max_num_queries(6):  # + the period row, the policy and where the rollups end
        report = cost_report(team=team, start=NOV)
    assert report.allocated == D("3000.00") and report.projected
    usage_days_roll(team=team, now=datetime(2026, 11, 20, tzinfo=zoneinfo.ZoneInfo(team.timezone)))
    with django_assert_max_num_queries(7):  # and the usage in two parts: the rollups, the rows since
        rolled = cost_report(team=team, start=NOV)
    assert rolled.rows == report.rows


@pytest.mark.django_db
@pytest.mark.parametrize("tz, last_of_oct, first_of_nov, nov_ends", [
    # Shanghai: UTC+8 all year.
    ("Asia/Shanghai", datetime(2026, 10, 31, 15, 59, 59, tzinfo=UTC), datetime(2026, 10, 31, 16, 0, tzinfo=UTC),
     datetime(2026, 11, 30, 16, 0, tzinfo=UTC)),
    # New York: October ends in EDT (UTC-4); DST ends on 1 Nov 2026, so November ends in EST (UTC-5).
    ("America/New_York", datetime(2026, 11, 1, 3, 59, 59, tzinfo=UTC), datetime(2026, 11, 1, 4, 0, tzinfo=UTC),
     datetime(2026, 12, 1, 5, 0, tzinfo=UTC)),
])
def test_month_edges_in_the_teams_time_zone(tz, last_of_oct, first_of_nov, nov_ends):
    team = TeamFactory(timezone=tz, monthly_cost="10.00")
    member = MemberJoinedFactory(team=team)
    old = _row_at(member, last_of_oct, prompt=7)
    new = _row_at(member, first_of_nov, prompt=3)
    last = _row_at(member, nov_ends.replace(microsecond=0) - (first_of_nov - last_of_oct), prompt=11)
    after = _row_at(member, nov_ends, prompt=1000)
    assert (old.period_start, new.period_start, last.period_start, after.period_start) == (
        date(2026, 10, 1), NOV, NOV, date(2026, 12, 1))
    with pytest.raises(ValidationError, match="not over yet"):
        period_close(team=team, start=NOV, now=nov_ends.replace(microsecond=0) - (first_of_nov - last_of_oct),
                     wait_seconds=0)
    period = period_close(team=team, start=NOV, now=nov_ends, wait_seconds=0)
    line = InvoiceLine.objects.get(invoice__period=period)
    assert (line.requests, line.prompt_tokens) == (2, 14)
    assert period.invoices.get().active_days == 30


@pytest.mark.django_db
def test_a_request_admitted_at_235959_settled_after_midnight_belongs_to_the_old_month():
    team = TeamFactory(timezone="Asia/Shanghai")
    member = MemberJoinedFactory(team=team)
    admitted = datetime(2026, 11, 30, 23, 59, 59, tzinfo=SHANGHAI)
    row = usage(member, period_start_for(team.timezone, admitted), started_at=admitted, duration_ms=90_000.0)
    assert row.period_start == NOV
    assert [r["member_id"] for r in period_usage(team=team, start=NOV)] == [member.pk]
    assert list(period_usage(team=team, start=date(2026, 12, 1))) == []


@pytest.mark.django_db
def test_the_month_so_far_uses_the_closes_own_split():
    team = TeamFactory(monthly_cost="100.00")
    a, b = MemberJoinedFactory(team=team), MemberJoinedFactory(team=team)
    usage(a, NOV, prompt=1, completion=0)
    usage(b, NOV, prompt=2, completion=0)
    billing_policy_update(team=team, kind="base_plus_usage", base_share=D("0.5"))
    report = cost_report(team=team, start=NOV)
    assert report.projected and report.status == "open" and report.policy == "base_plus_usage"
    projected = {r.member_id: r.amount for r in report.rows}
    period = period_close(team=team, start=NOV, now=datetime(2026, 12, 1, 1, tzinfo=SHANGHAI), wait_seconds=0)
    assert {i.member_id: i.allocated for i in period.invoices.all()} == projected == {a.pk: D("41.67"),
                                                                                    b.pk: D("58.33")}
    closed = cost_report(team=team, start=NOV)
    assert not closed.projected and {r.member_id: r.amount for r in closed.rows} == projected
    assert [r.requests for r in closed.rows] == [1, 1]


@pytest.mark.django_db
def test_reconciliation_finds_a_usage_row_missing_from_the_invoices():
    team = TeamFactory()
    a = MemberJoinedFactory(team=team)
    usage(a, NOV, prompt=10, completion=10)
    period = period_close(team=team, start=NOV, now=datetime(2026, 12, 1, 1, tzinfo=SHANGHAI), wait_seconds=0)
    assert period_reconciliation(period=period).ok
    usage(a, NOV, prompt=5, completion=0)  # a row written after the close
    report = period_reconciliation(period=period)
    assert not report.ok and report.mismatches == [(a.pk, "qwen2.5-7b-instruct")]


@pytest.mark.django_db
def test_seed_rate_bills_the_idle_capacity_to_the_named_payer_on_its_own_line():
    team = TeamFactory(monthly_cost="3000.00")
    a, b, pi = (MemberJoinedFactory(team=team, request_quota=100) for _ in range(3))
    for _ in range(30):
        usage(a, NOV, prompt=1, completion=1)
    for _ in range(15):
        usage(b, NOV, prompt=1, completion=1)
    billing_policy_update(team=team, kind="seed_rate", quota_unit="requests", idle_payer=pi)
    period = period_close(team=team, start=NOV, now=datetime(2026, 12, 1, 1, tzinfo=SHANGHAI), wait_seconds=0)
    assert {i.member_id: i.amount for i in period.invoices.all()} == {a.pk: D("300.00"), b.pk: D("150.00"),
                                                                     pi.pk: D("2550.00")}
    assert period.idle == D("2550.00") and period.unallocated == D("0.00")
    assert InvoiceLine.objects.get(invoice__member=pi).kind == "idle"


@pytest.mark.django_db
def test_a_stored_policy_reads_back_exactly_and_its_sentence_has_no_trailing_zeros():
    from billing.selectors import billing_policy_for_team, policy_params, policy_params_from_json, policy_params_to_json
    team = TeamFactory()
    billing_policy_update(team=team, completion_weight=D("2.5"), model_weights={"big": "3"})
    params = policy_params(billing_policy_for_team(team=team))
    assert (params.prompt_weight, params.completion_weight, params.model_weights) == (D(1), D("2.5"), {"big": D(3)})
    assert policy_params_from_json(policy_params_to_json(params)) == params
    a = MemberJoinedFactory(team=team)
    usage(a, NOV, prompt=1, completion=1)
    assert "prompt tokens weighted 1 and completion tokens 2.5 and by model." in cost_report(
        team=team, start=NOV).explanation


@pytest.mark.django_db
def test_invoice_detail_shows_the_effective_and_the_public_price(django_assert_max_num_queries):
    from billing.selectors import invoice_detail
    team = TeamFactory(monthly_cost="30.00")
    billing_policy_update(team=team, public_prices={"qwen2.5-7b-instruct": {"prompt": "0.5", "completion": "1.5"}})
    a = MemberJoinedFactory(team=team)
    usage(a, NOV, prompt=1_000_000, completion=1_000_000)
    usage(a, NOV, prompt=500_000, completion=0, model="unpriced")
    period = period_close(team=team, start=NOV, now=datetime(2026, 12, 1, 1, tzinfo=SHANGHAI), wait_seconds=0)
    invoice = period.invoices.get()
    with django_assert_max_num_queries(2):
        detail = invoice_detail(invoice=invoice)
    assert detail.tokens == 2_500_000 and detail.effective_price == D("12.000000")  # 30 CNY / 2.5M tokens
    assert detail.public_price_amount == D("2.00")  # 1M × 0.5 + 1M × 1.5 per 1M; the other model has no price
    assert [line.public_price_amount for line in detail.lines] == [D("2.00"), None]
