"""Billing's Celery tasks: thin, by id, idempotent; the schedule is CELERY_BEAT_SCHEDULE in settings.

The "due" tasks only list what is due and enqueue one task per team-month or period; the
services decide (a period's status moved by a conditional UPDATE, unique constraints), so a
rerun, two beats at once or a redelivered message changes nothing twice. A due task run
twice before a worker picks the first fan-out may enqueue a close or finalize twice: the
second one finds the period closed (finalized) and returns it unchanged.
"""
from datetime import date, datetime, timedelta

from celery import shared_task
from django.db import OperationalError
from django.db.models import Max, Q
from django.utils import timezone

from billing.models import BillingPeriod
from billing.selectors import statement_periods_pending
from tenants.models import Team
from tenants.periods import next_period_start, period_start_for
from billing.services.rollups import usage_days_roll_all
from tenants.services.reservations import reservations_sweep

RETRY = {"autoretry_for": (OperationalError,), "retry_backoff": 60, "max_retries": 5}
# A fanned-out close or finalize still queued when the next due run comes is dropped: that
# run enqueues it again (a worker that was down does not find a pile of duplicates).
CLOSE_EXPIRES = 3600
FINALIZE_EXPIRES = 24 * 3600


def _months(first: date, last: date) -> list[date]:
    months = []
    while first <= last:
        months.append(first)
        first = next_period_start(first)
    return months


def periods_due_to_close(*, now: datetime | None = None) -> list[tuple[int, date]]:
    """(team id, month) of every month over in its team's time zone and not yet closed, oldest first.

    Per team: the months after its newest closed (or finalized) period up to the one before
    the team's current month, and any older period still open. A team with no closed
    period yet starts with its previous month, if it existed then (the months before
    billing was switched on are closed only by hand: close_period TEAM --month).
    """
    now = now or timezone.now()
    teams = Team.objects.annotate(
        newest_closed=Max("billing_periods__start", filter=~Q(billing_periods__status=BillingPeriod.Status.OPEN)),
    ).order_by("pk")
    still_open: dict[int, list[date]] = {}
    for team_id, start in (BillingPeriod.objects.filter(status=BillingPeriod.Status.OPEN)
                           .order_by("start").values_list("team_id", "start")):
        still_open.setdefault(team_id, []).append(start)
    due = []
    for team in teams:
        current = period_start_for(team.timezone, now)
        last = _previous(current)
        if team.newest_closed is not None:
            first = next_period_start(team.newest_closed)
        else:
            first = max(period_start_for(team.timezone, team.created_at), last)
        months = set(_months(first, last)) | {start for start in still_open.get(team.pk, []) if start < current}
        due.extend((team.pk, start) for start in sorted(months))
    return due


def _actor(actor_id: int | None):
    """The user who asked for a close or finalize from a page (None: the scheduler)."""
    if actor_id is None:
        return None
    from django.contrib.auth import get_user_model

    return get_user_model().objects.filter(pk=actor_id).first()


def _previous(start: date) -> date:
    return date(start.year - (start.month == 1), (start.month - 2) % 12 + 1, 1)


def periods_due_to_finalize(*, now: datetime | None = None) -> list[int]:
    """Ids of closed periods whose review window (BillingPolicy.grace_days after closed_at) is over."""
    now = now or timezone.now()
    periods = (BillingPeriod.objects.filter(status=BillingPeriod.Status.CLOSED, closed_at__lte=now)
               .select_related("team__billing_policy").order_by("team_id", "start"))
    due = []
    for period in periods:
        policy = getattr(period.team, "billing_policy", None)
        grace = policy.grace_days if policy is not None else 0
        if period.closed_at + timedelta(days=grace) <= now:
            due.append(period.pk)
    return due


@shared_task(acks_late=True, **RETRY)
def period_close_task(team_id: int, period_start: str, actor_id: int | None = None) -> None:
    """Close one team's month (billing.services.period_close). Idempotent: a closed month is left as it is.

    Enqueued by periods_close_due_task; a rerun or a duplicate delivery finds the period
    closed and changes nothing, so it is acked late (a worker killed midway is retried).
    """
    from billing.services import period_close

    period_close(team=Team.objects.get(pk=team_id), start=date.fromisoformat(period_start), actor=_actor(actor_id))


def _now(now: str | None) -> datetime | None:
    """A task's optional `now` (ISO 8601 with an offset): the clock of whoever enqueued it (a test's moved time)."""
    if now is None:
        return None
    moment = datetime.fromisoformat(now)
    if moment.tzinfo is None:
        raise ValueError(f"now must carry its UTC offset (ISO 8601), not {now!r}")
    return moment


@shared_task(**RETRY)
def periods_close_due_task(now: str | None = None) -> int:
    """Hourly: enqueue period_close_task for every team-month over in its team's time zone and still open.

    Each team is so closed within the hour after its own midnight on the 1st, and its new
    month's quota counters are opened by the close. A rerun enqueues only what is still
    not closed. Returns how many closes it enqueued. The beat passes no `now` (the worker's
    clock decides); a caller may pass one to decide what is due as of then.
    """
    due = periods_due_to_close(now=_now(now))
    for team_id, start in due:
        period_close_task.apply_async((team_id, start.isoformat()), expires=CLOSE_EXPIRES)
    return len(due)


@shared_task(acks_late=True, **RETRY)
def period_finalize_task(period_id: int, actor_id: int | None = None) -> None:
    """Finalize one closed period (billing.services.period_finalize), then enqueue its statements.

    Idempotent: a finalized period is returned unchanged (its numbers stay), so it is acked
    late; a rerun enqueues the statements again, and their outbox sends only what is pending.
    """
    from billing.services import period_finalize

    period = period_finalize(period=BillingPeriod.objects.get(pk=period_id), actor=_actor(actor_id))
    period_statements_send_task.delay(period.pk)


@shared_task(acks_late=True, **RETRY)
def period_statements_send_task(period_id: int) -> int:
    """Send a finalized period's pending statements (billing.services.period_statements_send).

    Idempotent through the outbox: a rerun sends only what is still pending; a statement whose
    sending was interrupted (a killed worker) is marked needs_attention, never re-sent silently.
    Returns how many were sent.
    """
    from billing.services.statements import period_statements_send

    return period_statements_send(period=BillingPeriod.objects.get(pk=period_id))


@shared_task(**RETRY)
def periods_finalize_due_task(now: str | None = None) -> int:
    """Daily: enqueue period_finalize_task for every closed period whose grace_days have passed,
    and period_statements_send_task for finalized periods with statements still pending.

    A rerun enqueues only periods still closed (not yet finalized). Returns how many finalizes.
    `now` as in periods_close_due_task.
    """
    due = periods_due_to_finalize(now=_now(now))
    for period_id in due:
        period_finalize_task.apply_async((period_id,), expires=FINALIZE_EXPIRES)
    # Statements the mail server refused last time are retried once a day.
    for period_id in statement_periods_pending().values_list("pk", flat=True):
        period_statements_send_task.apply_async((period_id,), expires=FINALIZE_EXPIRES)
    return len(due)


@shared_task(acks_late=True, **RETRY)
def quota_warnings_task() -> int:
    """Every 15 minutes: e-mail members who reached 80 % or 100 % of a quota (billing.services.quota_warnings_send).

    One e-mail per member, period, quota and level however often it runs: a QuotaWarning
    row is committed before each e-mail and decides. A rerun sends only new crossings.
    Returns how many e-mails it sent.
    """
    from billing.services import quota_warnings_send

    return len(quota_warnings_send())


@shared_task(**RETRY)
def reservations_sweep_task() -> int:
    """Give back stale quota reservations (tenants.services.reservations); return how many requests' worth."""
    return sum(row["requests"] for row in reservations_sweep())


@shared_task(**RETRY)
def usage_days_roll_task() -> int:
    """Roll every team's settled days of usage up (billing.services.rollups); return how many days were written."""
    return sum(usage_days_roll_all().values())
