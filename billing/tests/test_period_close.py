"""period_close: drafts from the month's usage, once, whatever runs it twice or at once."""
import threading
import zoneinfo
from datetime import date, datetime
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import connection

from billing.models import BillingPeriod, Invoice, InvoiceLine
from billing.selectors import period_reconciliation
from billing.services import PERIOD_NOT_FIRST, PERIOD_NOT_OVER, billing_policy_update, period_close
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.models import AuditEvent, QuotaCounter, QuotaReservation
from tenants.tests.factories import QuotaCounterFactory, TeamFactory

D = Decimal
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
NOV = date(2026, 11, 1)
DEC = date(2026, 12, 1)
AFTER_NOV = datetime(2026, 12, 1, 0, 10, tzinfo=SHANGHAI)


def _team_with_usage(**team):
    t = TeamFactory(monthly_cost="3000.00", **team)
    a, b, c = (MemberJoinedFactory(team=t) for _ in range(3))
    usage(a, NOV, prompt=1000, completion=1000)  # 2000 weighted tokens
    usage(a, NOV, prompt=500, completion=500, model="qwen2.5-72b")  # 1000
    usage(b, NOV, prompt=1000, completion=0)  # 1000
    return t, (a, b, c)


def _assert_sums(period):
    invoices = list(period.invoices.prefetch_related("lines"))
    for invoice in invoices:
        assert sum((line.amount for line in invoice.lines.all()), D(0)) == invoice.amount
    assert sum((i.allocated for i in invoices), D(0)) == period.allocated
    assert period.allocated + period.unallocated == period.cost


@pytest.mark.django_db
def test_close_writes_one_draft_per_member_split_by_usage():
    team, (a, b, c) = _team_with_usage()
    period = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    assert period.status == BillingPeriod.Status.CLOSED and period.cost == D("3000.00")
    assert period.planned_cost == D("3000.00") and period.actual_cost is None
    amounts = {i.member_id: i.amount for i in period.invoices.all()}
    assert amounts == {a.pk: D("2250.00"), b.pk: D("750.00"), c.pk: D("0.00")}
    lines = {(l.invoice.member_id, l.model): l.amount for l in InvoiceLine.objects.select_related("invoice")}
    assert lines == {(a.pk, "qwen2.5-7b-instruct"): D("1500.00"), (a.pk, "qwen2.5-72b"): D("750.00"),
                     (b.pk, "qwen2.5-7b-instruct"): D("750.00")}
    assert period.policy["kind"] == "usage" and period.applied_policy == "usage" and "tokens used" in period.explanation
    _assert_sums(period)
    assert period_reconciliation(period=period).ok
    assert AuditEvent.objects.filter(data__action="billing.period_closed", subject_id=period.pk).count() == 1


@pytest.mark.django_db
def test_close_twice_keeps_one_invoice_per_member():
    team, members = _team_with_usage()
    first = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    second = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    assert first.pk == second.pk and second.closed_at == first.closed_at
    assert Invoice.objects.count() == 3 and InvoiceLine.objects.count() == 3
    assert AuditEvent.objects.filter(data__action="billing.period_closed").count() == 1


@pytest.mark.django_db
def test_rejected_and_failed_requests_cost_nothing_a_disconnect_pays_its_tokens():
    team = TeamFactory(monthly_cost="100.00")
    a, b = MemberJoinedFactory(team=team), MemberJoinedFactory(team=team)
    usage(a, NOV, prompt=100, completion=0)
    usage(b, NOV, prompt=50, completion=50, status="client_disconnected")
    for status in ("rejected", "upstream_error", "upstream_timeout", "upstream_unavailable"):
        usage(b, NOV, prompt=10_000, completion=10_000, status=status)
    period = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    assert {i.member_id: i.amount for i in period.invoices.all()} == {a.pk: D("50.00"), b.pk: D("50.00")}
    line = InvoiceLine.objects.get(invoice__member=b)
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (1, 50, 50)
    assert period_reconciliation(period=period).ok


@pytest.mark.django_db
def test_nobody_used_anything_falls_back_to_equal_and_says_so():
    team = TeamFactory(monthly_cost="100.00")
    members = [MemberJoinedFactory(team=team) for _ in range(3)]
    period = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    assert period.fell_back and period.applied_policy == "equal" and "Nobody used" in period.explanation
    assert sorted(i.amount for i in period.invoices.all()) == [D("33.33"), D("33.33"), D("33.34")]
    assert {l.kind for l in InvoiceLine.objects.all()} == {"base"}
    _assert_sums(period)
    assert len(members) == period.invoices.count()


@pytest.mark.django_db
def test_joined_mid_month_pays_the_fixed_part_pro_rata_by_active_days():
    team = TeamFactory(monthly_cost="90.00", timezone="Asia/Shanghai")
    billing_policy_update(team=team, kind="equal")
    early = MemberJoinedFactory(team=team)
    # Joined 16 Nov 00:30 Shanghai (15 Nov 16:30 UTC): active 16..30 Nov = 15 days of 30.
    late = MemberJoinedFactory(team=team, joined_at=datetime(2026, 11, 15, 16, 30, tzinfo=zoneinfo.ZoneInfo("UTC")))
    after = MemberJoinedFactory(team=team, joined_at=datetime(2026, 11, 30, 16, 0, tzinfo=zoneinfo.ZoneInfo("UTC")))
    suspended = MemberJoinedFactory(team=team, is_active=False)
    period = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    invoices = {i.member_id: i for i in period.invoices.all()}
    assert set(invoices) == {early.pk, late.pk}  # `after` joined on 1 Dec local time; `suspended` used nothing
    assert (invoices[early.pk].active_days, invoices[late.pk].active_days) == (30, 15)
    assert (invoices[early.pk].amount, invoices[late.pk].amount) == (D("60.00"), D("30.00"))
    assert suspended.pk not in invoices and after.pk not in invoices


@pytest.mark.django_db
def test_a_suspended_member_with_usage_is_billed_for_it():
    team = TeamFactory(monthly_cost="10.00")
    active, suspended = MemberJoinedFactory(team=team), MemberJoinedFactory(team=team, is_active=False)
    usage(active, NOV, prompt=300, completion=0)
    usage(suspended, NOV, prompt=100, completion=0)
    period = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    assert {i.member_id: i.amount for i in period.invoices.all()} == {active.pk: D("7.50"), suspended.pk: D("2.50")}


@pytest.mark.django_db
def test_close_opens_next_months_counters_for_active_members():
    team, (a, b, c) = _team_with_usage()
    MemberJoinedFactory(team=team, is_active=False)
    period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    opened = QuotaCounter.objects.filter(member__team=team, period_start=DEC)
    assert sorted(opened.values_list("member_id", flat=True)) == [a.pk, b.pk, c.pk]
    assert all(counter.token_limit == 1_000_000 for counter in opened)


@pytest.mark.django_db
def test_close_refuses_a_month_not_over_or_not_a_first_day():
    team = TeamFactory(timezone="Asia/Shanghai")
    # 30 Nov 23:59:59 in Shanghai: the month is not over there.
    with pytest.raises(ValidationError, match="not over yet"):
        period_close(team=team, start=NOV, now=datetime(2026, 11, 30, 23, 59, 59, tzinfo=SHANGHAI))
    with pytest.raises(ValidationError) as exc:
        period_close(team=team, start=date(2026, 11, 2), now=AFTER_NOV)
    assert exc.value.messages == [PERIOD_NOT_FIRST.format(start=date(2026, 11, 2))]
    assert "{" not in PERIOD_NOT_OVER.format(team="t", month="m", end="e", tz="z")
    assert not BillingPeriod.objects.exists()


@pytest.mark.django_db
def test_a_stuck_reservation_is_waited_for_then_released_and_recorded(settings):
    settings.QWENHUB_UPSTREAM_TIMEOUT = 0.3
    team, (a, b, c) = _team_with_usage()
    counter = QuotaCounterFactory(member=a, period_start=NOV, requests_reserved=2, tokens_reserved=900)
    for tokens in (400, 500):  # the gateway's rows of the two reservations
        QuotaReservation.objects.create(counter=counter, tokens=tokens, created_at=AFTER_NOV)
    import time
    began = time.monotonic()
    period = period_close(team=team, start=NOV, now=AFTER_NOV)
    assert time.monotonic() - began >= 0.3
    counter.refresh_from_db()
    assert (counter.requests_reserved, counter.tokens_reserved) == (0, 0)
    assert not QuotaReservation.objects.filter(counter=counter).exists()
    assert period.released_reservations == [
        {"member_id": a.pk, "counter_id": counter.pk, "requests": 2, "tokens": 900}]
    event = AuditEvent.objects.get(data__action="billing.reservations_released")
    assert event.kind == AuditEvent.Kind.RESERVATIONS_RELEASED and event.member_id == a.pk


@pytest.mark.django_db(transaction=True)
def test_close_waits_for_a_stream_admitted_before_midnight_and_bills_its_row():
    """Admitted 30 Nov 23:59:59 (Shanghai), settled after midnight: its row has November's period_start."""
    team = TeamFactory(monthly_cost="100.00", timezone="Asia/Shanghai")
    a, b = MemberJoinedFactory(team=team), MemberJoinedFactory(team=team)
    usage(a, NOV, prompt=100, completion=0)
    counter = QuotaCounterFactory(member=b, period_start=NOV, requests_reserved=1, tokens_reserved=500)

    def settle_after_midnight():
        import time
        time.sleep(0.4)
        usage(b, NOV, prompt=100, completion=200, started_at=datetime(2026, 11, 30, 23, 59, 59, tzinfo=SHANGHAI))
        QuotaCounter.objects.filter(pk=counter.pk).update(requests_reserved=0, tokens_reserved=0,
                                                          requests_used=1, tokens_used=300)
        connection.close()

    thread = threading.Thread(target=settle_after_midnight)
    thread.start()
    period = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=10)
    thread.join()
    assert period.released_reservations == []
    assert {i.member_id: i.amount for i in period.invoices.all()} == {a.pk: D("25.00"), b.pk: D("75.00")}
    assert period_reconciliation(period=period).ok


@pytest.mark.django_db(transaction=True)
def test_close_from_two_threads_at_once_writes_one_invoice_per_member():
    team, members = _team_with_usage()
    barrier = threading.Barrier(2)
    results, errors = [], []

    def close():
        try:
            barrier.wait()
            results.append(period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0).pk)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=close) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    period = BillingPeriod.objects.get()
    assert period.status == BillingPeriod.Status.CLOSED
    assert Invoice.objects.count() == 3 and InvoiceLine.objects.count() == 3
    assert sorted(Invoice.objects.values_list("member_id", flat=True)) == sorted(m.pk for m in members)
    assert AuditEvent.objects.filter(data__action="billing.period_closed").count() == 1
    _assert_sums(period)


@pytest.mark.django_db
def test_a_stuck_reservation_of_the_teams_cap_is_released_too():
    from tenants.models import TeamQuotaCounter
    team, members = _team_with_usage(token_cap=10_000_000)
    cap = TeamQuotaCounter.objects.create(team=team, period_start=NOV, token_limit=10_000_000, tokens_reserved=700)
    period = period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)
    cap.refresh_from_db()
    assert cap.tokens_reserved == 0
    assert period.released_reservations == [
        {"member_id": None, "team_counter_id": cap.pk, "requests": 0, "tokens": 700}]
    assert TeamQuotaCounter.objects.filter(team=team, period_start=DEC, token_limit=10_000_000).exists()


@pytest.mark.django_db
def test_a_late_close_of_an_older_month_opens_no_counters():
    team, members = _team_with_usage()
    period_close(team=team, start=date(2026, 10, 1), now=AFTER_NOV, wait_seconds=0)
    assert not QuotaCounter.objects.filter(period_start=NOV).exists()


@pytest.mark.django_db
def test_the_command_reports_released_reservations(settings):
    from tenants.tests.utils import run_command
    settings.QWENHUB_UPSTREAM_TIMEOUT = 0
    team = TeamFactory(slug="lab")
    member = MemberJoinedFactory(team=team)
    from billing.management.months import previous_period_start
    from tenants.periods import period_start_for
    last = previous_period_start(period_start_for(team.timezone))
    QuotaCounterFactory(member=member, period_start=last, requests_reserved=1, tokens_reserved=300)
    out, _ = run_command("close_period", "lab")
    assert f"Released a stuck reservation of member {member.pk}: 1 request(s), 300 tokens." in out
