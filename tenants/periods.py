"""Billing periods are the team's calendar months in the team's time zone (pure helpers)."""
import zoneinfo
from datetime import date, datetime, time

from django.utils import timezone


def period_start_for(tz_name: str, when: datetime | None = None) -> date:
    """Return the first day of the month that `when` falls in, in time zone tz_name."""
    local = (when or timezone.now()).astimezone(zoneinfo.ZoneInfo(tz_name))
    return local.date().replace(day=1)


def next_period_start(start: date) -> date:
    return date(start.year + (start.month == 12), start.month % 12 + 1, 1)


def period_reset_at(tz_name: str, start: date) -> datetime:
    """Return the instant the period beginning at start ends (the next month's midnight, local)."""
    return datetime.combine(next_period_start(start), time(0), tzinfo=zoneinfo.ZoneInfo(tz_name))
