"""The member's own pages: this month's quota and projected cost, usage, keys, requests, invoices.

Every read goes through a selector narrowed to `request.member` (dashboards.access): another
member's key or invoice is a 404. So that the overview stays fast with a busy month behind it,
the chart reads only today's rows live (past days and months are cached for an hour) and the
projection of the team's month is cached for a minute per team; the quota bars read the live
counters.
"""
import csv
import zoneinfo
from dataclasses import dataclass
from itertools import islice

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.handlers.asgi import ASGIRequest
from django.db.models import Q
from django.http import HttpResponseRedirect, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from billing.models import Invoice
from billing.reports import (
    days, months, months_back, team_cap_this_month, usage_by_month, usage_rows,
)
from billing.selectors import invoice_detail
from dashboards.access import SESSION_KEY, get_or_404, member_required
from dashboards.cache import PAST_DAYS_SECONDS, cached, month_report, usage_days
from dashboards.charts import Series, bar_chart
from dashboards.member.forms import CHART_MONTHS, PAGE_SIZE, ApiKeyCreateForm, UsageFilterForm
from proxy.selectors import public_models_for_member
from tenants.models import ApiKey
from tenants.periods import next_period_start, period_start_for
from tenants.selectors import member_history, member_keys, member_quota_this_month
from tenants.services import api_key_issue, api_key_revoke

REVOKED_BY_OWNER = "revoked by its owner on the dashboard"  # audit data, not a page text
CSV_CHUNK_ROWS = 2000
CSV_COLUMNS = ("started_at", "model", "endpoint", "status", "http_status", "stream", "prompt_tokens",
               "completion_tokens", "total_tokens", "cached_tokens", "ttft_ms", "duration_ms", "key")


@dataclass(frozen=True)
class Meter:
    """One quota bar: used of limit (limit None: unlimited)."""

    label: str
    used: int
    limit: int | None

    @property
    def percent(self) -> int:
        if not self.limit:
            return 100 if self.limit == 0 else 0
        return min(100, round(self.used * 100 / self.limit))

    @property
    def level(self) -> str:
        return "full" if self.limit is not None and self.percent >= 100 else "high" if self.percent >= 80 else ""


def _member_days(member, today):
    """The member's counted usage per day of this month (past days cached, today's live: dashboards.cache)."""
    since, until = months_back(member.team, 1)
    return usage_days(team=member.team, since=since, today=today, until=until, member=member)


def _usage_chart(member, span: int, today):
    """The member's tokens per day of this month (span 1), else per month of the last `span` months."""
    team = member.team
    since, until = months_back(team, span)
    this_month = months_back(team, 1)[0]
    this_month_days = _member_days(member, today)
    if span == 1:
        by_key = {r.day: (r.prompt_tokens, r.completion_tokens) for r in this_month_days}
        keys = days(since, until)
        labels = [f"{d:%d}" for d in keys]
        title = _("My tokens per day, %(month)s") % {"month": f"{since:%Y-%m}"}
    else:
        # Past months are closed: cached an hour. This month is the sum of its days (above).
        past = cached(f"member-months:{member.pk}:{since}:{this_month}",
                      lambda: usage_by_month(team=team, since=since, until=this_month, member=member),
                      PAST_DAYS_SECONDS)
        by_key = {r.month: (r.prompt_tokens, r.completion_tokens) for r in past}
        by_key[this_month] = (sum(r.prompt_tokens for r in this_month_days),
                              sum(r.completion_tokens for r in this_month_days))
        keys = months(since, until)
        labels = [f"{m:%Y-%m}" for m in keys]
        title = _("My tokens per month, last %(n)s months") % {"n": span}
    prompt = [by_key.get(k, (0, 0))[0] for k in keys]
    completion = [by_key.get(k, (0, 0))[1] for k in keys]
    return bar_chart(title=title, unit=_("tokens"), labels=labels,
                     series=[Series(_("prompt"), prompt), Series(_("completion"), completion)])


def _projection(member):
    # The team's whole month (everyone's usage sets each share): shared with the team page.
    report = month_report(team=member.team, start=period_start_for(member.team.timezone))
    return report, next((r for r in report.rows if r.member_id == member.pk), None)


@member_required
def member_home(request):
    member = request.member
    team = member.team
    quota = member_quota_this_month(member=member)
    today = timezone.localdate(timezone=zoneinfo.ZoneInfo(team.timezone))
    try:
        span = int(request.GET.get("months", 1))
    except ValueError:
        span = 1
    span = span if span in CHART_MONTHS else 1
    report, share = _projection(member)
    cap = team_cap_this_month(team=team)
    return render(request, "dashboards/member/home.html", {
        "quota": quota, "resets_in_days": (next_period_start(quota.period_start) - today).days,
        "meters": [Meter(_("requests"), quota.requests_used, quota.request_limit),
                   Meter(_("tokens"), quota.tokens_used, quota.token_limit)],
        "team_meter": Meter(_("team's tokens"), cap.tokens_used, cap.token_limit) if cap else None,
        "chart": _usage_chart(member, span, today), "span": span, "spans": CHART_MONTHS,
        "report": report, "share": share,
        "keys": list(member_keys(member=member)), "history": list(member_history(member=member)),
        "models": [m.name for m in public_models_for_member(member=member)],
        "base_url": settings.QWENHUB_PUBLIC_URL.rstrip("/") + "/v1", "now": timezone.now(),
    })


# --- keys -------------------------------------------------------------------------------

def _keys_page(request, form, status=200):
    return render(request, "dashboards/member/keys.html", {
        "form": form, "keys": list(member_keys(member=request.member)), "now": timezone.now(),
    }, status=status)


@require_GET
@member_required
def api_key_list(request):
    return _keys_page(request, ApiKeyCreateForm())


@never_cache
@require_POST
@member_required
def api_key_create(request):
    """Issue a key; the raw key is in this response only (never stored, never shown again)."""
    form = ApiKeyCreateForm(request.POST)
    if not form.is_valid():
        return _keys_page(request, form, status=400)
    key, raw = api_key_issue(member=request.member, label=form.cleaned_data["label"],
                             expires_days=form.cleaned_data["expires_days"], actor=request.user)
    return render(request, "dashboards/member/key_created.html", {
        "key": key, "raw_key": raw, "base_url": settings.QWENHUB_PUBLIC_URL.rstrip("/") + "/v1"})


@require_POST
@member_required
def api_key_revoke_view(request, key_id: int):
    key = get_or_404(ApiKey.objects.filter(member=request.member).select_related("member__team")
                     .defer("key_hash"), pk=key_id)
    try:
        api_key_revoke(key=key, actor=request.user, reason=REVOKED_BY_OWNER)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        messages.success(request, _("Key %(prefix)s… is revoked.") % {"prefix": key.prefix})
    return redirect("member:keys")


# --- requests ---------------------------------------------------------------------------

def _filtered_rows(request):
    """(form, queryset or None when the filters are invalid)."""
    form = UsageFilterForm(request.GET or None)
    if request.GET and not form.is_valid():
        return form, None
    filters = form.usage_filters() if form.is_bound else {}
    rows = usage_rows(team=request.member.team, member=request.member, **filters)
    return form, rows


@require_GET
@member_required
def usage_list(request):
    """The member's requests, newest first, a page at a time (keyset: no COUNT over the month)."""
    form, rows = _filtered_rows(request)
    page, next_cursor = [], None
    if rows is not None:
        after = form.cleaned_data.get("after") if form.is_bound else None
        if after:
            rows = rows.filter(Q(started_at__lt=after[0]) | Q(started_at=after[0], id__lt=after[1]))
        page = list(rows[:PAGE_SIZE + 1])
        if len(page) > PAGE_SIZE:
            page = page[:PAGE_SIZE]
            next_cursor = f"{page[-1].started_at.isoformat()}_{page[-1].pk}"
    query = request.GET.copy()
    query.pop("after", None)
    next_query = None
    if next_cursor:
        following = query.copy()
        following["after"] = next_cursor
        next_query = following.urlencode()
    prefixes = {k.pk: k.prefix for k in member_keys(member=request.member)}
    return render(request, "dashboards/member/requests.html", {
        "form": form, "rows": [(row, prefixes.get(row.api_key_id, "")) for row in page],
        "next_query": next_query, "first_query": query.urlencode(),
        "is_later_page": bool(form.is_bound and form.is_valid() and form.cleaned_data.get("after")),
        "models": [m.name for m in public_models_for_member(member=request.member)],
    }, status=200 if rows is not None else 400)


class _Echo:
    """csv.writer's file: hands each line back instead of keeping it."""

    def write(self, value):
        return value


def _csv_lines(rows, prefixes: dict, tz):
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    for r in rows.iterator(chunk_size=CSV_CHUNK_ROWS):
        yield writer.writerow([
            r.started_at.astimezone(tz).isoformat(timespec="milliseconds"), r.model, r.endpoint, r.status,
            r.http_status, int(r.stream), r.prompt_tokens, r.completion_tokens, r.total_tokens, r.cached_tokens,
            "" if r.ttft_ms is None else round(r.ttft_ms, 1), round(r.duration_ms, 1), prefixes.get(r.api_key_id, ""),
        ])


def _async_lines(lines, batch: int = 500):
    """The same lines for an ASGI server (a sync iterator would be read to its end before sending)."""
    lines = iter(lines)

    def take():
        return "".join(islice(lines, batch))

    async def stream():
        while chunk := await sync_to_async(take)():
            yield chunk
    return stream()


@require_GET
@member_required
def usage_csv(request):
    """The same filters as the list, every matching row, streamed (never built in memory)."""
    form, rows = _filtered_rows(request)
    if rows is None:
        return usage_list(request)
    member = request.member
    prefixes = {k.pk: k.prefix for k in member_keys(member=member)}
    lines = _csv_lines(rows, prefixes, zoneinfo.ZoneInfo(member.team.timezone))
    if isinstance(request, ASGIRequest):
        lines = _async_lines(lines)
    response = StreamingHttpResponse(lines, content_type="text/csv; charset=utf-8")
    stamp = timezone.localdate(timezone=zoneinfo.ZoneInfo(member.team.timezone))
    response["Content-Disposition"] = (f'attachment; filename="requests-{member.team.slug}-'
                                       f'{request.user.get_username()}-{stamp:%Y%m%d}.csv"')
    return response


# --- invoices ---------------------------------------------------------------------------

def _issued_invoices():
    # Only issued invoices: a draft may still change (an admin's cost correction) before it is final.
    return Invoice.objects.filter(number__isnull=False, issued_at__isnull=False)


@require_GET
@member_required
def invoice_list(request):
    invoices = list(_issued_invoices().filter(member=request.member).select_related("period")
                    .order_by("-period__start"))
    return render(request, "dashboards/member/invoices.html", {"invoices": invoices})


@require_GET
@member_required
def invoice_statement(request, invoice_id: int):
    """One issued invoice as a printable statement (the e-mailed statement links here).

    The invoice may be of any of the person's active memberships (the link in an e-mail does not
    know which team the switcher shows): the page is then shown for that membership.
    """
    by_pk = {m.pk: m for m in request.memberships}
    invoice = get_or_404(_issued_invoices().filter(member_id__in=list(by_pk)).only("pk", "member_id"),
                         pk=invoice_id)
    request.member = by_pk[invoice.member_id]
    detail = invoice_detail(invoice=invoice)
    return render(request, "dashboards/member/invoice.html", {
        "detail": detail, "invoice": detail.invoice, "period": detail.invoice.period,
        "usage_lines": [line for line in detail.lines if line.kind == "usage"],
        "other_lines": [line for line in detail.lines if line.kind != "usage"],
    })


# --- the team switcher ------------------------------------------------------------------

@require_POST
@member_required
def team_switch(request):
    """Show another of the person's memberships (only one of their own: anything else is ignored)."""
    slug = request.POST.get("team", "")
    if any(m.team.slug == slug for m in request.memberships):
        request.session[SESSION_KEY] = slug
    target = request.POST.get("next") or request.META.get("HTTP_REFERER") or "/"
    # A path or a URL of this site only; anything else (a view name to redirect(), "0", "x:") is the overview.
    if not target.startswith(("/", "http://", "https://")) or not url_has_allowed_host_and_scheme(
            target, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        target = "/"
    return HttpResponseRedirect(target)
