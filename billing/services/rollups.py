"""Daily usage rollups (billing.models.UsageDay): the charts' days of a busy month without its rows.

A day is rolled up once it has been over, in the team's time zone, for longer than the
longest request (tenants.services.reservations.reservation_max_age): a request still running
at midnight writes its row with the day it started, and after that none can. Each run rolls
the days since the last one up (at most MAX_DAYS per run, so the first one on a large table is
bounded) and rolls the last AGAIN_DAYS again, for a row written late by a gateway that waited
for its database. A day is written whole, in one transaction with the team's mark, so a reader
sees a day either from its rows or from its rollup, never from both.
"""
import logging
import zoneinfo
from datetime import date, datetime, timedelta

from django.db import transaction
from django.db.models import Count, Min, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from billing.models import UsageDay, UsageDayRollup, UsageRecord
from billing.selectors import usage_rows_of_days
from tenants.models import Team
from tenants.services.reservations import reservation_max_age

log = logging.getLogger("qwenhub.billing")

MAX_DAYS = 92
AGAIN_DAYS = 2


def usage_days_settled_until(*, team: Team, now: datetime | None = None) -> date:
    """The first day of the team that may still get usage rows: every day before it is over for good."""
    now = now or timezone.now()
    return (now - timedelta(seconds=reservation_max_age())).astimezone(zoneinfo.ZoneInfo(team.timezone)).date()


def _first_usage_day(team: Team) -> date | None:
    # by the (team, period_start) index: the month of the oldest row, less the day before it (a
    # request that began a moment before midnight is admitted in the month after)
    first = UsageRecord.objects.filter(team=team).aggregate(first=Min("period_start"))["first"]
    return first - timedelta(days=1) if first else None


def usage_days_roll(*, team: Team, now: datetime | None = None) -> int:
    """Roll the team's settled days up to date; returns how many days were (re)written."""
    settled = usage_days_settled_until(team=team, now=now)
    with transaction.atomic():
        list(Team.objects.select_for_update().filter(pk=team.pk).values_list("pk"))  # one roll of a team at a time
        state = UsageDayRollup.objects.filter(team=team).first()
        rolled = state.until if state is not None and state.timezone == team.timezone else None
        if rolled is not None:
            first = rolled - timedelta(days=AGAIN_DAYS)
        else:  # never rolled, or the team's days moved with its time zone: from the start
            UsageDay.objects.filter(team=team).delete()
            first = _first_usage_day(team) or settled
        last = min(settled, first + timedelta(days=MAX_DAYS))
        if last <= first:
            return 0
        UsageDay.objects.filter(team=team, day__gte=first, day__lt=last).delete()
        UsageDay.objects.bulk_create(
            UsageDay(team=team, member_id=r["member_id"], model=r["model"], day=r["day"],
                     period_start=r["period_start"], requests=r["requests"], prompt_tokens=r["prompt"],
                     completion_tokens=r["completion"], cached_tokens=r["cached"])
            for r in (usage_rows_of_days(team=team, since=first, until=last)
                      .values("day", "member_id", "model", "period_start")
                      .annotate(requests=Count("id"), prompt=Coalesce(Sum("prompt_tokens"), 0),
                                completion=Coalesce(Sum("completion_tokens"), 0),
                                cached=Coalesce(Sum("cached_tokens"), 0))
                      .order_by()))
        UsageDayRollup.objects.update_or_create(team=team, defaults={
            "timezone": team.timezone, "until": max(last, rolled or last), "updated_at": timezone.now()})
    days = (last - first).days
    log.debug("usage of team %s rolled up for %d days before %s", team.slug, days, last)
    return days


def usage_days_roll_all(*, now: datetime | None = None) -> dict[str, int]:
    """usage_days_roll for every team: {team slug: days written}."""
    return {team.slug: usage_days_roll(team=team, now=now) for team in Team.objects.order_by("pk")}
