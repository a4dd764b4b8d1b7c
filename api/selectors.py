"""Reads the API needs that no app offers yet, composed from the apps' own models and reads.

Usage figures always come from billing.reports (usage_rows/usage_by_day); this adds
only the lists (periods, invoices, upstreams) and the cached-token sums the OpenAI-style
usage reports next to usage_by_day's counts.
"""
import zoneinfo
from datetime import date

from django.db.models import QuerySet, Sum
from django.db.models.functions import TruncDate

from billing.models import BillingPeriod, Invoice
from billing.reports import usage_rows
from billing.selectors import BILLED_STATUSES
from proxy.models import Upstream
from tenants.models import Member, Team


def member_invoices_issued(*, member: Member) -> QuerySet[Invoice]:
    """The member's issued (numbered) invoices, newest month first."""
    return (Invoice.objects.filter(member=member, issued_at__isnull=False).select_related("period")
            .order_by("-period__start", "-pk"))


def team_invoices(*, team: Team, start: date | None = None) -> QuerySet[Invoice]:
    """The team's invoices (drafts included), newest month first, by member name."""
    invoices = Invoice.objects.filter(team=team).select_related("period", "member__user")
    if start is not None:
        invoices = invoices.filter(period__start=start)
    return invoices.order_by("-period__start", "member__user__username", "pk")


def team_periods(*, team: Team) -> QuerySet[BillingPeriod]:
    """The team's billing periods, newest first."""
    return BillingPeriod.objects.filter(team=team).order_by("-start")


def team_period_get(*, team: Team, start: date) -> BillingPeriod | None:
    return BillingPeriod.objects.filter(team=team, start=start).select_related("team").first()


def upstream_list() -> QuerySet[Upstream]:
    """The catalog's upstreams by name, with the models routed to them (never their vLLM key)."""
    return Upstream.objects.defer("api_key").prefetch_related("routes__model").order_by("name")


def cached_tokens_by_day(*, team: Team, since: date, until: date, by: str | None = None) -> dict:
    """{(day, member id | model | None): cached prompt tokens} of the counted usage (usage_by_day's rows)."""
    key = {"member": "member_id", "model": "model"}.get(by)
    rows = (usage_rows(team=team, since=since, until=until).filter(status__in=BILLED_STATUSES)
            .annotate(day=TruncDate("started_at", tzinfo=zoneinfo.ZoneInfo(team.timezone)))
            .values("day", *([key] if key else [])).annotate(cached=Sum("cached_tokens")).order_by())
    return {(r["day"], r[key] if key else None): r["cached"] or 0 for r in rows}


def team_month_costs(*, team: Team, months: list[date]) -> dict[date, tuple[object, bool]]:
    """{month start: (the month's cost, whether it is the real bill)}: a closed month's split cost, else the plan.

    Open (and future) months use the team's monthly_cost as it is now, like the projection.
    """
    closed = {p.start: p for p in BillingPeriod.objects.filter(team=team, start__in=months)
              .exclude(status=BillingPeriod.Status.OPEN)}
    return {m: ((closed[m].cost, closed[m].actual_cost is not None) if m in closed else (team.monthly_cost, False))
            for m in months}
