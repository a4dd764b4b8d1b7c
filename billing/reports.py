"""Usage as people read it: a member's or a team's requests, listed and aggregated by day.

The dashboards, the management API and the OpenAI-style usage endpoints all read usage
through these (never their own queries), so a figure is the same wherever it is shown.

- Lists (`usage_rows`) show every request, whatever its status, newest first.
- Aggregates (`usage_by_day`) count what billing counts (billing.selectors.BILLED_STATUSES:
  answered requests, a disconnect included); rejected and failed requests cost nothing and
  are not in them.
- Days are the team's calendar days (its time zone), like its months.
"""
from dataclasses import dataclass
import zoneinfo
from datetime import date, datetime, timedelta

from django.db.models import Count, QuerySet, Sum
from django.utils import timezone

from billing.models import UsageDay, UsageRecord
from billing.selectors import (
    BILLED_STATUSES, CostReport, ShareRow, cost_report, local_midnight, usage_days_rolled_until, usage_rows_of_days,
)
from tenants.models import Member, Team
from tenants.periods import next_period_start, period_start_for

LIST_FIELDS = ("id", "request_id", "member_id", "api_key_id", "endpoint", "model", "prompt_tokens",
               "completion_tokens", "total_tokens", "cached_tokens", "status", "http_status", "stream",
               "started_at", "ttft_ms", "duration_ms")
GROUPS = (None, "member", "model")


def months_back(team: Team, months: int, now: datetime | None = None) -> tuple[date, date]:
    """[first day, day after the last) of the last `months` calendar months, this one included."""
    start = period_start_for(team.timezone, now)
    first = start
    for _ in range(max(1, months) - 1):
        first = (first - timedelta(days=1)).replace(day=1)
    return first, next_period_start(start)


def usage_rows(*, team: Team, member: Member | None = None, since: date | None = None, until: date | None = None,
               model: str | None = None, status: str | None = None) -> QuerySet[UsageRecord]:
    """Requests of the team (or of one member), newest first; days [since, until) in the team's time zone."""
    rows = UsageRecord.objects.filter(team=team)
    if member is not None:
        rows = rows.filter(member=member)
    if since is not None:
        rows = rows.filter(started_at__gte=local_midnight(team, since))
    if until is not None:
        rows = rows.filter(started_at__lt=local_midnight(team, until))
    if model:
        rows = rows.filter(model=model)
    if status:
        rows = rows.filter(status=status)
    return rows.only(*LIST_FIELDS).order_by("-started_at", "-id")


class _Tokens:
    """prompt_tokens + completion_tokens of a usage aggregate."""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class DayUsage(_Tokens):
    day: date
    key: object  # the member id or model name grouped by, None when not grouped
    requests: int
    prompt_tokens: int
    completion_tokens: int


def usage_by_day(*, team: Team, since: date, until: date, member: Member | None = None,
                 by: str | None = None) -> list[DayUsage]:
    """Counted usage per team day [since, until), optionally per member or model.

    The days rolled up (billing.services.rollups) come from their rollups, the rest from the
    usage rows: three small queries (where the rollups end, the rollups, the rows) however many
    rows the days hold.
    """
    if by not in GROUPS:
        raise ValueError(f"by must be one of {GROUPS}")
    # (the rollups never reach today: no need to ask where they end for today's figures)
    rolled = usage_days_rolled_until(team=team) if since < period_today(team) else None
    split = min(max(since, rolled or since), until)
    rolled_days = _usage_days_rolled(team, since, split, member, by) if split > since else []
    return rolled_days + (_usage_days_of_rows(team, split, until, member, by) if until > split else [])


def _group(by: str | None) -> list[str]:
    return ["day"] + ([f"{by}_id" if by == "member" else by] if by else [])


def _day_usage(rows, fields: list[str], by: str | None) -> list[DayUsage]:
    return [DayUsage(r["day"], r[fields[1]] if by else None, r["requests"], r["prompt"] or 0, r["completion"] or 0)
            for r in rows]


def _usage_days_rolled(team, since, until, member, by) -> list[DayUsage]:
    rows = UsageDay.objects.filter(team=team, day__gte=since, day__lt=until)
    if member is not None:
        rows = rows.filter(member=member)
    fields = _group(by)
    return _day_usage(rows.values(*fields).annotate(requests=Sum("requests"), prompt=Sum("prompt_tokens"),
                                                    completion=Sum("completion_tokens")).order_by(*fields), fields, by)


def _usage_days_of_rows(team, since, until, member, by) -> list[DayUsage]:
    rows = usage_rows_of_days(team=team, since=since, until=until)
    if member is not None:
        rows = rows.filter(member=member)
    fields = _group(by)
    return _day_usage(rows.values(*fields).annotate(requests=Count("id"), prompt=Sum("prompt_tokens"),
                                                    completion=Sum("completion_tokens")).order_by(*fields), fields, by)


def period_today(team: Team) -> date:
    return timezone.localtime(timezone.now(), zoneinfo.ZoneInfo(team.timezone)).date()


def days(since: date, until: date) -> list[date]:
    return [since + timedelta(days=n) for n in range((until - since).days)]


@dataclass(frozen=True)
class MemberProjection:
    report: CostReport
    row: ShareRow | None  # None: the member is not billed this month


def member_projection(*, member: Member, now: datetime | None = None) -> MemberProjection:
    """The member's share and cost of this month so far, from the close's own code (billing.selectors.cost_report)."""
    report = cost_report(team=member.team, start=period_start_for(member.team.timezone, now or timezone.now()))
    return MemberProjection(report, next((r for r in report.rows if r.member_id == member.pk), None))


# --- the team admin's month -------------------------------------------------------------

def _bar(used: int, limit: int | None) -> int:
    if limit is None:
        return 0
    return 100 if limit == 0 else min(100, max(0, round(used * 100 / limit)))


@dataclass(frozen=True)
class MemberMonthUse:
    """A member of the team with this month's quota counter (the member's quotas before the month opens)."""

    member: Member
    requests_used: int
    request_limit: int | None
    tokens_used: int
    token_limit: int | None

    @property
    def requests_left(self) -> int | None:
        return None if self.request_limit is None else max(0, self.request_limit - self.requests_used)

    @property
    def tokens_left(self) -> int | None:
        return None if self.token_limit is None else max(0, self.token_limit - self.tokens_used)

    @property
    def request_bar(self) -> int:
        """Percent of the request quota used, 0..100 (a bar's width; 0 when unlimited)."""
        return _bar(self.requests_used, self.request_limit)

    @property
    def token_bar(self) -> int:
        return _bar(self.tokens_used, self.token_limit)

    @property
    def used_share(self) -> float | None:
        """The larger of requests and tokens used ÷ limit (0..1+), None when both are unlimited."""
        shares = [used / limit for used, limit in ((self.requests_used, self.request_limit),
                                                    (self.tokens_used, self.token_limit)) if limit]
        if not shares:
            return 0.0 if (self.request_limit == 0 or self.token_limit == 0) else None
        return max(shares)


def team_members_month(*, team: Team, start: date) -> list[MemberMonthUse]:
    """Every member of the team (suspended ones too) with the month's counter, by username (two queries)."""
    from tenants.models import QuotaCounter

    counters = {c["member_id"]: c for c in QuotaCounter.objects.filter(member__team=team, period_start=start)
                .values("member_id", "requests_used", "request_limit", "tokens_used", "token_limit")}
    rows = []
    for member in Member.objects.filter(team=team).select_related("user").order_by("user__username", "pk"):
        c = counters.get(member.pk)
        rows.append(MemberMonthUse(member, c["requests_used"] if c else 0,
                                   c["request_limit"] if c else member.request_quota,
                                   c["tokens_used"] if c else 0, c["token_limit"] if c else member.token_quota))
    return rows


def team_month_by_member_model(*, team: Team, start: date):
    """The month's counted usage per member × model with the member's username, in SQL (one query; the CSV)."""
    return (UsageRecord.objects.filter(team=team, period_start=start, status__in=BILLED_STATUSES)
            .values("member_id", "member__user__username", "model")
            .annotate(requests=Count("id"), prompt_tokens=Sum("prompt_tokens"),
                      completion_tokens=Sum("completion_tokens"), cached_tokens=Sum("cached_tokens"))
            .order_by("member__user__username", "member_id", "model"))


def team_periods(*, team: Team):
    """The team's billing periods, newest first, each with invoice_count and invoiced (the amounts' sum)."""
    from billing.models import BillingPeriod

    return (BillingPeriod.objects.filter(team=team)
            .annotate(invoice_count=Count("invoices"), invoiced=Sum("invoices__amount")).order_by("-start"))


def period_invoices(*, period):
    """A period's invoices with their members, by number then member (one query)."""
    return period.invoices.select_related("member__user").order_by("sequence", "member__user__username", "pk")
@dataclass(frozen=True)
class MonthUsage(_Tokens):
    month: date  # the period's first day
    requests: int
    prompt_tokens: int
    completion_tokens: int


def usage_by_month(*, team: Team, since: date, until: date, member: Member | None = None) -> list[MonthUsage]:
    """Counted usage per billing month [since, until) (months as billing sees them: period_start), one query."""
    rows = UsageRecord.objects.filter(team=team, status__in=BILLED_STATUSES, period_start__gte=since,
                                      period_start__lt=until)
    if member is not None:
        rows = rows.filter(member=member)
    rows = (rows.values("period_start").annotate(requests=Count("id"), prompt=Sum("prompt_tokens"),
                                                 completion=Sum("completion_tokens")).order_by("period_start"))
    return [MonthUsage(r["period_start"], r["requests"], r["prompt"] or 0, r["completion"] or 0) for r in rows]


def months(since: date, until: date) -> list[date]:
    """The first days of the months in [since, until)."""
    found, month = [], since.replace(day=1)
    while month < until:
        found.append(month)
        month = next_period_start(month)
    return found


@dataclass(frozen=True)
class TeamCap:
    token_limit: int
    tokens_used: int


def team_cap_this_month(*, team: Team, now: datetime | None = None) -> TeamCap | None:
    """The team-wide token cap of this month and its use (its counter, else Team.token_cap); None: no cap."""
    from tenants.models import TeamQuotaCounter

    start = period_start_for(team.timezone, now)
    counter = TeamQuotaCounter.objects.filter(team=team, period_start=start).only(
        "token_limit", "tokens_used").first()
    limit = counter.token_limit if counter else team.token_cap
    if limit is None:
        return None
    return TeamCap(limit, counter.tokens_used if counter else 0)
