"""The team admin's pages: every member's month, the cost split, the GPU's health, and the team's actions.

Every page is `team_admin_required` and reads only the viewer's chosen team: a member, key
or period is looked up through that team, so another team's id is a 404. Actions are
POST-only, CSRF-protected, take a reason, and go through one service (or the billing task
that calls it) with the admin as actor.
"""
import csv
import zoneinfo
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import HttpResponseBadRequest, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.views.decorators.http import require_GET, require_POST

from billing.models import BillingPeriod
from billing.reports import (
    days, period_invoices, team_month_by_member_model, team_members_month, team_periods,
)
from billing.selectors import current_period_start, period_get, period_is_over
from billing.services import period_set_actual_cost
from billing.tasks import period_close_task, period_finalize_task
from dashboards.access import get_or_404, team_admin_required
from dashboards.cache import month_report, usage_days
from dashboards.charts import Series, bar_chart
from dashboards.team.forms import ActualCostForm, MemberLimitsForm, MonthForm, ReasonForm
from proxy.health import health_history, health_latest
from tenants.selectors import api_key_list, member_history, member_keys, member_list
from tenants.services import api_key_revoke, invite_pending, member_invite_resend, member_update

TOP_MEMBERS = 7
HISTORY_WINDOW = timedelta(hours=1)


def _errors(exc: ValidationError) -> list[str]:
    return list(exc.messages)


# --- the team's month -------------------------------------------------------------------

def tokens_chart(*, team, start, today, until, names: dict[int, str]):
    """Tokens per team day, stacked by member: the month's top members, the rest as "others"."""
    rows = usage_days(team=team, since=start, today=today, until=until, by="member")
    labels = days(start, until)
    index = {day: i for i, day in enumerate(labels)}
    per_member: dict[int, list[int]] = defaultdict(lambda: [0] * len(labels))
    for row in rows:
        per_member[row.key][index[row.day]] += row.tokens
    ranked = sorted(per_member, key=lambda m: (-sum(per_member[m]), names.get(m, "")))
    series = [Series(names.get(m, f"#{m}"), per_member[m]) for m in ranked[:TOP_MEMBERS]]
    if len(ranked) > TOP_MEMBERS:
        rest = [sum(per_member[m][i] for m in ranked[TOP_MEMBERS:]) for i in range(len(labels))]
        series.append(Series(_("others"), rest))
    return bar_chart(title=_("Tokens per day by member"), unit=_("tokens"),
                     labels=[f"{d:%d}" for d in labels], series=series)


def _effective_price(cost: Decimal, tokens: int) -> Decimal | None:
    """The month's cost per 1M tokens counted so far (display only)."""
    return (cost * 1_000_000 / tokens).quantize(Decimal("0.000001")) if tokens else None


def _health_rows(latest, history, tz):
    """Per enabled upstream: its newest sample, a chart of its last hour and the last few samples."""
    by_upstream = defaultdict(list)
    for sample in history:
        by_upstream[sample.upstream_id].append(sample)
    rows = []
    for upstream, sample in latest:
        samples = by_upstream.get(upstream.pk, [])
        chart = bar_chart(
            title=_("Requests on %(upstream)s, last hour") % {"upstream": upstream.name}, unit=_("requests"),
            labels=[f"{timezone.localtime(s.taken_at, tz):%H:%M}" for s in samples],
            series=[Series(_("running"), [s.running or 0 for s in samples]),
                    Series(_("waiting"), [s.waiting or 0 for s in samples])])
        rows.append({"upstream": upstream, "latest": sample, "chart": chart, "recent": samples[::-1][:10]})
    return rows


@require_GET
@team_admin_required
def team_home(request):
    team = request.member.team
    now = timezone.now()
    start = current_period_start(team=team, now=now)
    tz = zoneinfo.ZoneInfo(team.timezone)
    today = timezone.localtime(now, tz).date()
    report = month_report(team=team, start=start)
    members = team_members_month(team=team, start=start)
    shares = {row.member_id: row for row in report.rows}
    names = {m.member.pk: m.member.user.get_username() for m in members}
    tokens = sum(r.prompt_tokens + r.completion_tokens for r in report.rows)
    latest = health_latest()
    return render(request, "dashboards/team/home.html", {
        "start": start, "report": report, "tokens": tokens,
        "effective_price": _effective_price(report.cost, tokens),
        "members": [(m, shares.get(m.member.pk)) for m in members],
        "chart": tokens_chart(team=team, start=start, today=today, until=today + timedelta(days=1), names=names),
        "health": _health_rows(latest, health_history(since=HISTORY_WINDOW, now=now), tz),
    })


@require_GET
@team_admin_required
def month_export(request):
    """The month's counted usage per member × model as CSV, streamed (?month=YYYY-MM, default this month)."""
    team = request.member.team
    if "month" in request.GET:
        form = MonthForm(request.GET)
        if not form.is_valid():
            return HttpResponseBadRequest(_("Enter a month as YYYY-MM, e.g. 2026-11."))
        start = form.cleaned_data["month"]
    else:
        start = current_period_start(team=team)

    class Echo:
        def write(self, value):
            return value

    writer = csv.writer(Echo())

    def lines():
        yield writer.writerow(["month", "member", "model", "requests", "prompt_tokens", "completion_tokens",
                               "total_tokens", "cached_tokens"])
        for row in team_month_by_member_model(team=team, start=start).iterator(chunk_size=2000):
            prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
            yield writer.writerow([f"{start:%Y-%m}", row["member__user__username"], row["model"], row["requests"],
                                   prompt, completion, prompt + completion, row["cached_tokens"] or 0])

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{team.slug}-{start:%Y-%m}-usage.csv"'
    return response


# --- a member ---------------------------------------------------------------------------

def _team_member(request, member_id):
    return get_or_404(member_list(team=request.member.team), pk=member_id)


def _member_page(request, member, *, limits_form=None, reason_form=None, status=200):
    return render(request, "dashboards/team/member.html", {
        "subject": member, "limits_form": limits_form or MemberLimitsForm.for_member(member),
        "reason_form": reason_form or ReasonForm(), "keys": list(member_keys(member=member)),
        "history": list(member_history(member=member)), "now": timezone.now(),
        "invite_pending": invite_pending(member=member),
    }, status=status)


@require_GET
@team_admin_required
def member_detail(request, member_id):
    return _member_page(request, _team_member(request, member_id))


@require_POST
@team_admin_required
def member_limits_update(request, member_id):
    member = _team_member(request, member_id)
    form = MemberLimitsForm.for_member(member, request.POST)
    if form.is_valid():
        try:
            member_update(member=member, data=form.changes(), actor=request.user,
                          reason=form.cleaned_data["reason"])
        except ValidationError as exc:
            for message in _errors(exc):
                form.add_error(None, message)
        else:
            messages.success(request, _("%(member)s's limits were saved.") % {"member": member.user.get_username()})
            return redirect("team:member", member_id=member.pk)
    return _member_page(request, member, limits_form=form, status=400)


def _set_active(request, member_id, active: bool):
    member = _team_member(request, member_id)
    form = ReasonForm(request.POST)
    if form.is_valid() and not active and member.pk == request.member.pk:
        form.add_error(None, _("You cannot suspend yourself: ask another admin of the team."))
    if not form.is_valid():
        return _member_page(request, member, reason_form=form, status=400)
    member_update(member=member, data={"is_active": active}, actor=request.user, reason=form.cleaned_data["reason"])
    name = member.user.get_username()
    messages.success(request, (_("%(member)s is active again.") if active else _("%(member)s is suspended."))
                     % {"member": name})
    return redirect("team:member", member_id=member.pk)


@require_POST
@team_admin_required
def member_suspend(request, member_id):
    return _set_active(request, member_id, False)


@require_POST
@team_admin_required
def member_reactivate(request, member_id):
    return _set_active(request, member_id, True)


@require_POST
@team_admin_required
def member_invite_again(request, member_id):
    """A fresh set-password link for someone invited who has not set a password (it expired, or was lost)."""
    member = _team_member(request, member_id)
    try:
        member_invite_resend(member=member, actor=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(_errors(exc)))
    else:
        messages.success(request, _("A new invitation was sent to %(email)s.") % {"email": member.user.email})
    return redirect("team:member", member_id=member.pk)


@require_POST
@team_admin_required
def key_revoke(request, key_id):
    key = get_or_404(api_key_list().filter(member__team=request.member.team), pk=key_id)
    form = ReasonForm(request.POST)
    if not form.is_valid():
        return _member_page(request, key.member, reason_form=form, status=400)
    try:
        api_key_revoke(key=key, actor=request.user, reason=form.cleaned_data["reason"])
    except ValidationError as exc:
        messages.error(request, " ".join(_errors(exc)))
    else:
        messages.success(request, _("Key %(prefix)s… is revoked.") % {"prefix": key.prefix})
    return redirect("team:member", member_id=key.member_id)


# --- periods and invoices ---------------------------------------------------------------

def _team_period(request, period_id):
    return get_or_404(team_periods(team=request.member.team), pk=period_id)


def _closable_months(team, periods, now):
    """The last 12 months that are over and not closed yet (a month with no period row included)."""
    status = {p.start: p.status for p in periods}
    months, start = [], current_period_start(team=team, now=now)
    for _i in range(12):
        start = (start - timedelta(days=1)).replace(day=1)
        if status.get(start, BillingPeriod.Status.OPEN) == BillingPeriod.Status.OPEN:
            months.append(start)
    return months


@require_GET
@team_admin_required
def period_list(request):
    team = request.member.team
    periods = list(team_periods(team=team))
    return render(request, "dashboards/team/periods.html", {
        "periods": periods, "closable": _closable_months(team, periods, timezone.now()),
    })


def _period_page(request, period, *, cost_form=None, status=200):
    return render(request, "dashboards/team/period.html", {
        "period": period, "invoices": list(period_invoices(period=period)),
        "cost_form": cost_form or ActualCostForm(initial={"amount": period.actual_cost or period.cost}),
    }, status=status)


@require_GET
@team_admin_required
def period_detail(request, period_id):
    return _period_page(request, _team_period(request, period_id))


@require_POST
@team_admin_required
def period_actual_cost(request, period_id):
    period = _team_period(request, period_id)
    form = ActualCostForm(request.POST)
    if form.is_valid():
        try:
            period_set_actual_cost(period=period, amount=form.cleaned_data["amount"], actor=request.user,
                                   reason=form.cleaned_data["reason"])
        except ValidationError as exc:
            for message in _errors(exc):
                form.add_error(None, message)
        else:
            messages.success(request, _("The actual cost was entered and the drafts recomputed."))
            return redirect("team:period", period_id=period.pk)
    return _period_page(request, period, cost_form=form, status=400)


@require_POST
@team_admin_required
def period_close(request):
    """Queue the close of a month that is over (billing.tasks.period_close_task; it may wait for streams)."""
    team = request.member.team
    form = MonthForm(request.POST)
    if not form.is_valid():
        messages.error(request, " ".join(form.errors["month"]))
        return redirect("team:periods")
    start = form.cleaned_data["month"]
    period = period_get(team=team, start=start)
    if not period_is_over(team=team, start=start, now=timezone.now()):
        messages.error(request, _("%(month)s is not over yet.") % {"month": f"{start:%Y-%m}"})
    elif period is not None and period.status != BillingPeriod.Status.OPEN:
        messages.error(request, _("%(month)s is already closed.") % {"month": f"{start:%Y-%m}"})
    else:
        try:
            period_close_task.delay(team.pk, start.isoformat(), request.user.pk)
        except ValidationError as exc:
            messages.error(request, " ".join(_errors(exc)))
        else:
            messages.success(request, _("Closing %(month)s was queued: its draft invoices appear here once it is "
                                        "done.") % {"month": f"{start:%Y-%m}"})
    return redirect("team:periods")


@require_POST
@team_admin_required
def period_finalize(request, period_id):
    """Queue the finalize of a closed period (billing.tasks.period_finalize_task: numbers, then statements)."""
    period = _team_period(request, period_id)
    month = f"{period.start:%Y-%m}"
    if period.status != BillingPeriod.Status.CLOSED:
        messages.error(request, _("Only a closed period can be finalized: %(month)s is %(status)s.")
                       % {"month": month, "status": period.get_status_display()})
    else:
        try:
            period_finalize_task.delay(period.pk, request.user.pk)
        except ValidationError as exc:
            messages.error(request, " ".join(_errors(exc)))
        else:
            messages.success(request, _("Finalizing %(month)s was queued: the invoices are numbered and the "
                                        "statements sent.") % {"month": month})
    return redirect("team:period", period_id=period.pk)
