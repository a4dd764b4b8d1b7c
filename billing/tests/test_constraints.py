"""The database says no to what a retry or a race could break, whatever the services do."""
from datetime import date
from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.models import BillingPeriod, Invoice, InvoiceLine
from billing.policies import POLICIES, MemberMonth, ModelUsage, PolicyParams, split_cost
from billing.services.invoices import Draft, _lines
from billing.tests.factories import MemberJoinedFactory
from tenants.tests.factories import TeamFactory

NOV = date(2026, 11, 1)


def _refused(make):
    with pytest.raises(IntegrityError), transaction.atomic():
        make()


@pytest.mark.django_db
def test_one_period_per_team_month_starting_on_the_1st_and_closed_only_with_a_cost():
    team = TeamFactory()
    BillingPeriod.objects.create(team=team, start=NOV, currency="CNY")
    _refused(lambda: BillingPeriod.objects.create(team=team, start=NOV, currency="CNY"))
    _refused(lambda: BillingPeriod.objects.create(team=team, start=date(2026, 10, 2), currency="CNY"))
    _refused(lambda: BillingPeriod.objects.create(team=team, start=date(2026, 9, 1), currency="CNY", status="closed"))
    _refused(lambda: BillingPeriod.objects.create(team=team, start=date(2026, 8, 1), currency="CNY", status="paid"))


@pytest.mark.django_db
def test_one_invoice_per_member_and_period_one_sequence_per_team_and_valid_lines():
    team = TeamFactory()
    a, b = MemberJoinedFactory(team=team), MemberJoinedFactory(team=team)
    period = BillingPeriod.objects.create(team=team, start=NOV, currency="CNY")
    fields = {"period": period, "team": team, "allocated": 1, "amount": 1, "active_days": 30}
    invoice = Invoice.objects.create(member=a, **fields)
    _refused(lambda: Invoice.objects.create(member=a, **fields))
    Invoice.objects.filter(pk=invoice.pk).update(sequence=1, number="T-1", issued_at="2026-12-01T00:00Z")
    _refused(lambda: Invoice.objects.create(member=b, sequence=1, number="T-2", issued_at="2026-12-01T00:00Z",
                                            **fields))
    _refused(lambda: Invoice.objects.create(member=b, sequence=2, **fields))  # a number needs all three
    draft = Invoice.objects.create(member=b, **fields)
    InvoiceLine.objects.create(invoice=draft, kind="usage", model="m", amount=1)
    _refused(lambda: InvoiceLine.objects.create(invoice=draft, kind="usage", model="m", amount=1))
    _refused(lambda: InvoiceLine.objects.create(invoice=draft, kind="adjustment", amount=1))  # no reason, no row
    _refused(lambda: InvoiceLine.objects.create(invoice=draft, kind="usage", model="n", amount=-1))


members = st.lists(st.tuples(
    st.dictionaries(st.sampled_from(["a", "b", "c"]),
                    st.tuples(st.integers(1, 50), st.integers(0, 10**7), st.integers(0, 10**7)), max_size=3),
    st.integers(0, 31), st.one_of(st.none(), st.integers(0, 10**6))), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(members=members, kind=st.sampled_from(POLICIES), currency=st.sampled_from(["JPY", "CNY", "KWD"]),
       cents=st.integers(0, 10**8), payer=st.booleans())
def test_lines_always_sum_to_the_members_amount(members, kind, currency, cents, payer):
    months = [MemberMonth(i + 1, {m: ModelUsage(*u) for m, u in usage.items()}, request_quota=q, token_quota=q,
                          active_days=days) for i, (usage, days, q) in enumerate(members)]
    total = Decimal(cents).scaleb(-{"JPY": 0, "CNY": 2, "KWD": 3}[currency])
    params = PolicyParams(kind=kind, quota_unit="requests", idle_payer_id=1 if payer else None,
                          model_weights={"b": Decimal("2.5")})
    split = split_cost(total, months, params, currency)
    draft = Draft(months, split, params, {"a": {"prompt": "0.3", "completion": "0.6"}})
    for month in months:
        lines = _lines(month, split.amounts[month.member_id], draft, currency)
        assert sum((line.amount for line in lines), Decimal(0)) == split.amounts[month.member_id]
        assert all(line.amount >= 0 for line in lines)
        assert {l.model for l in lines if l.kind == "usage"} == set(month.by_model)
