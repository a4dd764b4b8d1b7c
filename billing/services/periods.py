"""Writes for billing periods: close a month (drafts), correct its cost, finalize it (numbered invoices).

Every step checks the period's status first and moves it by a conditional UPDATE under a
lock on the period row, so a rerun, a retry after a crash or two processes at once do the
work once; the unique constraints (one period per team-month, one invoice per member and
period, one number per team and sequence) are the backstop.
"""
import logging
import time as _time
from datetime import date, datetime
from decimal import Decimal

from django.conf import settings
from django.core import mail
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.translation import gettext_lazy as _
from django.db.models import F, Max, Q
from django.template.loader import render_to_string
from django.utils import timezone, translation

from billing.models import BillingPeriod, Invoice
from billing.money import minor_unit, quantize
from billing.selectors import (
    billing_policy_for_team, current_period_start, period_is_over, period_split, policy_params,
    policy_params_from_json, policy_params_to_json, team_admin_addresses,
)
from billing.services.audit import (
    ACTUAL_COST_SET, PERIOD_CLOSED, PERIOD_FINALIZED, RESERVATIONS_RELEASED, billing_audit,
)
from billing.services.invoices import Draft, invoice_months, invoices_write_drafts
from billing.services.statements import SEND_TIMEOUT_SECONDS, statement_period_url
from billing.policies import split_cost
from tenants.models import Member, QuotaCounter, QuotaReservation, Team, TeamQuotaCounter
from tenants.periods import next_period_start, period_reset_at
from tenants.services import quota_counters_open_for_team

PERIOD_NOT_FIRST = _("A billing period starts on the 1st of a month: {start} is not one.")
PERIOD_NOT_OVER = _("{team}'s {month} is not over yet: it ends at {end} ({tz}).")
PERIOD_OPEN = _("{team}'s {month} is still open: close it first (close_period {team} --month {month}).")
PERIOD_FINALIZED_ALREADY = _("{team}'s {month} is finalized: its invoices are issued and never change; "
                            "correct an invoice with an adjustment on a later month.")
COST_INVALID = _("The actual cost must be a non-negative amount in {currency}'s minor unit ({unit}), e.g. 2999.50.")
COST_REASON_REQUIRED = _("Say why the cost changed (a reason for the audit trail).")
RESERVATION_POLL_SECONDS = 0.25

logger = logging.getLogger(__name__)


def _month(start: date) -> str:
    return f"{start:%Y-%m}"


def _held(prefix: str = "") -> Q:
    return Q(**{f"{prefix}tokens_reserved__gt": 0}) | Q(**{f"{prefix}requests_reserved__gt": 0})


def _reservations_held(team: Team, start: date) -> bool:
    return (QuotaCounter.objects.filter(_held(), member__team=team, period_start=start).exists()
            or TeamQuotaCounter.objects.filter(team=team, period_start=start, tokens_reserved__gt=0).exists())


def _wait_for_reservations(team: Team, start: date, bound: float) -> bool:
    """Wait (outside any transaction) up to `bound` seconds for the period's reservations to settle."""
    deadline = _time.monotonic() + bound
    while (held := _reservations_held(team, start)) and (left := deadline - _time.monotonic()) > 0:
        _time.sleep(min(RESERVATION_POLL_SECONDS, left))
    return not held


def _release_stuck_reservations(team: Team, start: date) -> list[dict]:
    """Give back what the period's counters still reserve (requests that will never settle); return it."""
    released = []
    stuck = (QuotaCounter.objects.select_for_update(no_key=True, of=("self",))
             .filter(_held(), member__team=team, period_start=start).order_by("pk")
             .values("pk", "member_id", "requests_reserved", "tokens_reserved"))
    for row in stuck:
        QuotaCounter.objects.filter(pk=row["pk"]).update(
            requests_reserved=F("requests_reserved") - row["requests_reserved"],
            tokens_reserved=F("tokens_reserved") - row["tokens_reserved"])
        released.append({"member_id": row["member_id"], "counter_id": row["pk"],
                         "requests": row["requests_reserved"], "tokens": row["tokens_reserved"]})
    team_stuck = (TeamQuotaCounter.objects.select_for_update(no_key=True)
                  .filter(team=team, period_start=start, tokens_reserved__gt=0).values("pk", "tokens_reserved"))
    for row in team_stuck:
        TeamQuotaCounter.objects.filter(pk=row["pk"]).update(
            tokens_reserved=F("tokens_reserved") - row["tokens_reserved"])
        released.append({"member_id": None, "team_counter_id": row["pk"], "requests": 0,
                         "tokens": row["tokens_reserved"]})
    # Their reservation rows go too (a settlement arriving later finds none and gives back nothing),
    # so reconcile and the sweep do not see reservations the counters no longer hold.
    QuotaReservation.objects.filter(counter__member__team=team, counter__period_start=start).delete()
    return released


def _released_report(team: Team, period: BillingPeriod, released: list[dict], bound: float) -> bool:
    """E-mail the team's active admins what the close released; True if sent.

    Sent once, by the close that moved the period to closed, after its commit: a rerun
    finds the period closed and sends nothing. A failure (no admin address, the mail server
    refusing) is logged and the close stands; the record stays on the period
    (released_reservations) and in the audit trail. A process killed between the commit and
    the send loses the e-mail rather than sending it twice.
    """
    to = team_admin_addresses(team=team)
    if not to:
        logger.warning("%s %s: %d stuck reservation(s) released, but no active admin has an e-mail address",
                       team.slug, _month(period.start), len(released))
        return False
    names = dict(Member.objects.filter(pk__in=[r["member_id"] for r in released if r["member_id"]])
                 .values_list("pk", "user__username"))
    rows = [{"username": names.get(r["member_id"], f"#{r['member_id']}") if r["member_id"] else "",
             "requests": r["requests"], "tokens": r["tokens"]} for r in released]
    context = {"team": team, "start": period.start, "rows": rows, "bound": f"{bound:g}",
               "url": statement_period_url(period=period)}
    with translation.override(settings.LANGUAGE_CODE):
        subject = " ".join(render_to_string("billing/email/reservations_released_subject.txt", context).split())
        body = render_to_string("billing/email/reservations_released.txt", context)
    try:
        connection = mail.get_connection(timeout=getattr(settings, "EMAIL_TIMEOUT", None) or SEND_TIMEOUT_SECONDS)
        sent = mail.EmailMessage(subject, body, settings.DEFAULT_FROM_EMAIL, to, connection=connection).send()
    except Exception:  # noqa: BLE001 - the month is closed whatever the mail server says
        logger.exception("%s %s: the report of released reservations was not sent", team.slug, _month(period.start))
        return False
    return bool(sent)


def _open_next_month(team: Team, start: date, now: datetime) -> int:
    """Open the new month's counters (the quota reset) if the month after `start` is the current one."""
    following = next_period_start(start)
    if following != current_period_start(team=team, now=now):
        return 0  # a late close of an older month: the months after it opened long ago, or never will
    return quota_counters_open_for_team(team=team, period_start=following)


def _check_start(start: date) -> None:
    if start.day != 1:
        raise ValidationError(PERIOD_NOT_FIRST.format(start=start))


def period_close(*, team: Team, start: date, actor=None, now: datetime | None = None,
                 wait_seconds: float | None = None) -> BillingPeriod:
    """Close the team's month: freeze its usage into draft invoices, one per member billed. Idempotent.

    Run once the month is over in the team's time zone (hourly by the scheduler, or by
    `close_period`). It first waits, outside any transaction, up to `wait_seconds`
    (QWENHUB_UPSTREAM_TIMEOUT by default: no request can stream longer) for the requests
    admitted before midnight to settle; what is still reserved then will never settle and is
    given back, recorded (period.released_reservations and an audit event per counter) and,
    after the commit, reported to the team's admins by e-mail (once: by the close that closed it).
    Then, in one transaction holding the period row: opens next month's counters, splits the
    planned cost (team.monthly_cost, rounded to the currency) with the team's policy, writes
    the drafts, and moves the status open → closed. A rerun, or a second close racing this
    one, finds the period closed and returns it unchanged.
    """
    now = now or timezone.now()
    _check_start(start)
    if not period_is_over(team=team, start=start, now=now):
        raise ValidationError(PERIOD_NOT_OVER.format(team=team.slug, month=_month(start), tz=team.timezone,
                                                     end=period_reset_at(team.timezone, start).isoformat()))
    period, _ = BillingPeriod.objects.get_or_create(team=team, start=start, defaults={"currency": team.currency})
    if period.status != BillingPeriod.Status.OPEN:
        return period
    bound = settings.QWENHUB_UPSTREAM_TIMEOUT if wait_seconds is None else wait_seconds
    _wait_for_reservations(team, start, bound)
    with transaction.atomic(durable=True):
        period = BillingPeriod.objects.select_for_update(no_key=True, of=("self",)).get(pk=period.pk)
        if period.status != BillingPeriod.Status.OPEN:
            return period
        team = Team.objects.get(pk=team.pk)  # the cost and settings as they are now
        released = _release_stuck_reservations(team, start)
        for row in released:
            billing_audit(action=RESERVATIONS_RELEASED, team=team, member_id=row["member_id"], actor=actor,
                          subject_id=row.get("counter_id") or row.get("team_counter_id"),
                          reason=f"still reserved {bound:g} s after the end of {_month(start)}",
                          data={"period": start.isoformat(), **row})
        opened = _open_next_month(team, start, now)
        policy = billing_policy_for_team(team=team)
        params = policy_params(policy)
        cost = quantize(team.monthly_cost, team.currency)
        billed, split = period_split(team=team, start=start, cost=cost, params=params)
        period.currency, period.cost = team.currency, cost
        invoices = invoices_write_drafts(period=period, draft=Draft([b.month for b in billed], split, params,
                                                                    policy.public_prices or {}))
        fields = {"currency": team.currency, "planned_cost": team.monthly_cost, "cost": cost,
                  "policy": policy_params_to_json(params, public_prices=policy.public_prices),
                  "applied_policy": split.policy, "explanation": split.explanation,
                  "explanation_parts": split.explained.to_json(), "allocated": split.allocated,
                  "idle": split.idle, "unallocated": split.unallocated, "fell_back": split.fell_back,
                  "released_reservations": released, "closed_at": timezone.now(), "updated_at": timezone.now()}
        moved = BillingPeriod.objects.filter(pk=period.pk, status=BillingPeriod.Status.OPEN).update(
            status=BillingPeriod.Status.CLOSED, **fields)
        assert moved == 1  # the row is locked: nobody else can have moved it
        billing_audit(action=PERIOD_CLOSED, team=team, actor=actor, subject_id=period.pk,
                      data={"period": start.isoformat(), "cost": str(cost), "policy": split.policy,
                            "invoices": len(invoices), "released": len(released), "counters_opened": opened})
    period.refresh_from_db()
    if released:
        _released_report(team, period, released, bound)
    return period


def _cost(amount, currency: str) -> Decimal:
    try:
        value = Decimal(str(amount))
    except ArithmeticError:
        value = None
    if value is None or not value.is_finite() or value < 0 or value != quantize(value, currency):
        raise ValidationError(COST_INVALID.format(currency=currency, unit=minor_unit(currency)))
    return value


@transaction.atomic(durable=True)
def period_set_actual_cost(*, period: BillingPeriod, amount, actor=None, reason: str) -> BillingPeriod:
    """Enter the month's real cost (the actual GPU or cloud bill) and recompute the drafts with it.

    Only a closed period: the split uses the policy snapshot and the usage the close stored
    (never today's policy or a re-aggregation), so only the money changes. Running it again
    with the same amount rewrites the same drafts.
    """
    period = BillingPeriod.objects.select_for_update(no_key=True, of=("self",)).select_related("team").get(pk=period.pk)
    team = period.team
    if period.status == BillingPeriod.Status.OPEN:
        raise ValidationError(PERIOD_OPEN.format(team=team.slug, month=_month(period.start)))
    if period.status == BillingPeriod.Status.FINALIZED:
        raise ValidationError(PERIOD_FINALIZED_ALREADY.format(team=team.slug, month=_month(period.start)))
    if not reason or not reason.strip():
        raise ValidationError(COST_REASON_REQUIRED)
    value = _cost(amount, period.currency)
    before = period.actual_cost
    params = policy_params_from_json(period.policy)
    months = invoice_months(period=period)
    split = split_cost(value, months, params, period.currency)
    period.actual_cost, period.cost = value, value
    invoices_write_drafts(period=period, draft=Draft(months, split, params, period.policy.get("public_prices", {})))
    period.applied_policy, period.explanation, period.fell_back = split.policy, split.explanation, split.fell_back
    period.explanation_parts = split.explained.to_json()
    period.allocated, period.idle, period.unallocated = split.allocated, split.idle, split.unallocated
    period.save(update_fields=["actual_cost", "cost", "applied_policy", "explanation", "explanation_parts",
                               "fell_back", "allocated", "idle", "unallocated", "updated_at"])
    billing_audit(action=ACTUAL_COST_SET, team=team, actor=actor, subject_id=period.pk, reason=reason.strip(),
                  data={"period": period.start.isoformat(), "before": None if before is None else str(before),
                        "after": str(value), "planned": str(period.planned_cost)})
    return period


def invoice_number(*, team: Team, start: date, sequence: int) -> str:
    """LAB-2026-11-007: the team's slug, the month billed, the team's running number."""
    return f"{team.slug.upper()}-{start:%Y-%m}-{sequence:03d}"


@transaction.atomic(durable=True)
def period_finalize(*, period: BillingPeriod, actor=None, now: datetime | None = None) -> BillingPeriod:
    """Issue the period's invoices: number them per team without gaps, status closed → finalized. Idempotent.

    Refuses an open period. The team row is locked (FOR NO KEY UPDATE) while numbers are
    taken, then the period row: two finalizes of the same team are serialized, so numbers
    never repeat or skip; a finalized period is returned unchanged.
    """
    now = now or timezone.now()
    team = Team.objects.select_for_update(no_key=True).get(pk=period.team_id)
    period = BillingPeriod.objects.select_for_update(no_key=True, of=("self",)).get(pk=period.pk)
    if period.status == BillingPeriod.Status.FINALIZED:
        return period
    if period.status == BillingPeriod.Status.OPEN:
        raise ValidationError(PERIOD_OPEN.format(team=team.slug, month=_month(period.start)))
    last = Invoice.objects.filter(team=team).aggregate(last=Max("sequence"))["last"] or 0
    invoices = list(Invoice.objects.filter(period=period).order_by("member_id"))
    for offset, invoice in enumerate(invoices, start=1):
        invoice.sequence = last + offset
        invoice.number = invoice_number(team=team, start=period.start, sequence=invoice.sequence)
        invoice.issued_at = now
    Invoice.objects.bulk_update(invoices, ["sequence", "number", "issued_at"])
    moved = BillingPeriod.objects.filter(pk=period.pk, status=BillingPeriod.Status.CLOSED).update(
        status=BillingPeriod.Status.FINALIZED, finalized_at=now, updated_at=now)
    assert moved == 1
    billing_audit(action=PERIOD_FINALIZED, team=team, actor=actor, subject_id=period.pk,
                  data={"period": period.start.isoformat(), "invoices": len(invoices),
                        "numbers": [invoices[0].number, invoices[-1].number] if invoices else []})
    period.refresh_from_db()
    return period
