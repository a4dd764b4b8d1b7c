"""The month's aggregates the pages share, cached so a busy month costs a day's rows, not a month's.

- The month's split (billing.selectors.cost_report: everyone's usage sets each share) is one
  entry per team and month for a minute, read by the team page and every member's page.
- Usage per day: usage rows are append-only and a past day gets rows only from requests still
  running at its end, so the days before today are cached an hour and today's are read live.
"""
from datetime import date

from django.core.cache import cache

from billing.reports import usage_by_day
from billing.selectors import CostReport, cost_report

REPORT_SECONDS = 60
PAST_DAYS_SECONDS = 3600


def cached(key: str, compute, seconds: int):
    value = cache.get(key)
    if value is None:
        value = compute()
        cache.set(key, value, seconds)
    return value


def month_report(*, team, start: date) -> CostReport:
    """cost_report of the team's month, at most a minute old."""
    return cached(f"team-report:{team.pk}:{start}", lambda: cost_report(team=team, start=start), REPORT_SECONDS)


def usage_days(*, team, since: date, today: date, until: date, member=None, by: str | None = None):
    """usage_by_day over [since, until): the days before today from the cache, today's and later live."""
    who = f"m{member.pk}" if member is not None else "team"
    past = (cached(f"usage-days:{team.pk}:{who}:{by}:{since}:{today}",
                   lambda: usage_by_day(team=team, since=since, until=today, member=member, by=by), PAST_DAYS_SECONDS)
            if since < today else [])
    return past + usage_by_day(team=team, since=max(today, since), until=until, member=member, by=by)
