"""Reads for billing: a period's usage aggregated in SQL, the members it bills, the month so far, reconciliation.

What a period bills (the rules the close and the month-so-far report share):

- **Usage**: the team's usage rows whose `period_start` is the period's (the month in which
  the request was admitted, so a stream admitted at 23:59:59 belongs to the old month
  whenever it settled). Only answered requests count (`ok`, and `client_disconnected`,
  which pays for the tokens generated before the client left: tenants.quota.ANSWERED_STATUSES);
  rejected requests and upstream failures cost nothing.
- **Members billed**: every member with counted usage in the period, and every member who is
  active and had joined before the period's end. A suspended member without usage in the
  month is not billed (suspensions carry no date, so a suspended member with usage is billed
  as if active to the month's end).
- **Active days** (the fixed parts of `equal` and `base_plus_usage` are pro rata by them):
  from the day the member joined, in the team's time zone, or the period's first day if
  later, to the period's last day, both included; at least 1 for a member with usage.
- **Quotas** (`quota`, `seed_rate`): the period's counter limits (top-ups included), or the
  member's quotas when the member has no counter for the period.
"""
import zoneinfo
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import Decimal

from django.db.models import Count, Sum
from django.db.models.functions import TruncDate

from billing.models import (
    BillingPeriod, BillingPolicy, Invoice, InvoiceLine, StatementEmail, UsageDay, UsageDayRollup, UsageRecord,
)
from billing.money import PRICE_PLACES, ZERO, quantize
from billing.policies import Explanation, MemberMonth, ModelUsage, PolicyParams, Split, policy_name, split_cost
from tenants.models import Member, QuotaCounter, Team
from tenants.periods import next_period_start, period_reset_at, period_start_for
from tenants.quota import ANSWERED_STATUSES

BILLED_STATUSES = tuple(sorted(ANSWERED_STATUSES))


# --- the policy -------------------------------------------------------------------------

def billing_policy_for_team(*, team: Team) -> BillingPolicy:
    """Return the team's policy, or an unsaved one with the defaults (a new team starts on `usage`)."""
    try:
        return BillingPolicy.objects.get(team=team)
    except BillingPolicy.DoesNotExist:
        return BillingPolicy(team=team)


def _exact(value) -> Decimal:
    """A stored decimal without the column's trailing zeros (1.000000 → 1, 0.500000 → 0.5), exactly."""
    number = Decimal(str(value))
    return number.quantize(Decimal(1)) if number == number.to_integral_value() else number.normalize()


def policy_params(policy: BillingPolicy) -> PolicyParams:
    return PolicyParams(
        kind=policy.kind, prompt_weight=_exact(policy.prompt_weight),
        completion_weight=_exact(policy.completion_weight),
        model_weights={name: _exact(w) for name, w in (policy.model_weights or {}).items()},
        base_share=_exact(policy.base_share), quota_unit=policy.quota_unit, idle_payer_id=policy.idle_payer_id,
    )


def policy_params_to_json(params: PolicyParams, *, public_prices: dict | None = None) -> dict:
    """The snapshot a period keeps of the policy it was split with (decimals as strings)."""
    return {
        "kind": params.kind, "prompt_weight": str(params.prompt_weight),
        "completion_weight": str(params.completion_weight),
        "model_weights": {k: str(v) for k, v in sorted(params.model_weights.items())},
        "base_share": str(params.base_share), "quota_unit": params.quota_unit, "idle_payer_id": params.idle_payer_id,
        "public_prices": public_prices or {},
    }


def policy_params_from_json(data: dict) -> PolicyParams:
    return PolicyParams(
        kind=data["kind"], prompt_weight=Decimal(data["prompt_weight"]),
        completion_weight=Decimal(data["completion_weight"]),
        model_weights={k: Decimal(v) for k, v in data.get("model_weights", {}).items()},
        base_share=Decimal(data["base_share"]), quota_unit=data["quota_unit"], idle_payer_id=data.get("idle_payer_id"),
    )


# --- periods ----------------------------------------------------------------------------

def period_get(*, team: Team, start: date) -> BillingPeriod | None:
    return BillingPeriod.objects.filter(team=team, start=start).first()


def period_starts_at(*, team: Team, start: date) -> datetime:
    """The instant the period begins (local midnight of the 1st, DST-safe)."""
    return datetime.combine(start, time(0), tzinfo=zoneinfo.ZoneInfo(team.timezone))


def period_is_over(*, team: Team, start: date, now: datetime) -> bool:
    return now >= period_reset_at(team.timezone, start)


def current_period_start(*, team: Team, now: datetime | None = None) -> date:
    return period_start_for(team.timezone, now)


# --- usage and members ------------------------------------------------------------------

def period_usage(*, team: Team, start: date, rolled: bool = False):
    """The period's counted usage per member × model, aggregated in SQL (one query).

    rolled=True (the month so far, not the close): the days rolled up come from their rollups
    (billing.services.rollups), the rest from the rows; the same figures, in three small queries.
    """
    until = usage_days_rolled_until(team=team) if rolled else None
    rows = UsageRecord.objects.filter(team=team, period_start=start, status__in=BILLED_STATUSES)
    if until is None or until <= start - timedelta(days=1):
        return (rows.values("member_id", "model").annotate(
            requests=Count("id"), prompt_tokens=Sum("prompt_tokens"), completion_tokens=Sum("completion_tokens"))
            .order_by("member_id", "model"))
    totals: dict[tuple, dict] = {}
    rolled_days = (UsageDay.objects.filter(team=team, period_start=start, day__lt=until).values("member_id", "model")
                   .annotate(n=Sum("requests"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")))
    recent = (rows.filter(started_at__gte=local_midnight(team, until)).values("member_id", "model")
              .annotate(n=Count("id"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")))
    for r in [*rolled_days, *recent]:
        t = totals.setdefault((r["member_id"], r["model"]), {"member_id": r["member_id"], "model": r["model"],
                                                             "requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
        t["requests"] += r["n"]
        t["prompt_tokens"] += r["prompt"] or 0
        t["completion_tokens"] += r["completion"] or 0
    return [totals[k] for k in sorted(totals)]


def local_midnight(team: Team, day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zoneinfo.ZoneInfo(team.timezone))


def usage_days_rolled_until(*, team: Team) -> date | None:
    """The day before which the team's days are rolled up (billing.services.rollups), in its time zone now."""
    return (UsageDayRollup.objects.filter(team=team, timezone=team.timezone)
            .values_list("until", flat=True).first())


def usage_rows_of_days(*, team: Team, since: date, until: date):
    """The counted usage rows of the requests started on the team's days [since, until), each with its `day`."""
    # The months the rows were admitted in, listed (a request begun just before midnight is
    # admitted in the next month): the (team, period_start, started_at) index then bounds
    # started_at within each, where a range of months would scan them whole.
    months, month = [], since.replace(day=1)
    while month <= next_period_start(until - timedelta(days=1)):
        months.append(month)
        month = next_period_start(month)
    return (UsageRecord.objects.filter(
        team=team, status__in=BILLED_STATUSES, period_start__in=months,
        started_at__gte=local_midnight(team, since), started_at__lt=local_midnight(team, until))
        .annotate(day=TruncDate("started_at", tzinfo=zoneinfo.ZoneInfo(team.timezone))))


@dataclass(frozen=True)
class BilledMember:
    member: Member
    month: MemberMonth


def active_days(*, team: Team, start: date, joined_at: datetime, used: bool) -> int:
    """Days from joining (team's time zone; the 1st if earlier) to the period's last day, both included."""
    end = next_period_start(start)
    joined = joined_at.astimezone(zoneinfo.ZoneInfo(team.timezone)).date()
    days = max(0, (end - max(start, joined)).days)
    return max(days, 1) if used else days


def period_billed_members(*, team: Team, start: date, rolled: bool = False) -> list[BilledMember]:
    """The members the period bills, with their month as the policies see it (three queries; rolled: period_usage)."""
    by_member: dict[int, dict[str, ModelUsage]] = {}
    for row in period_usage(team=team, start=start, rolled=rolled):
        by_member.setdefault(row["member_id"], {})[row["model"]] = ModelUsage(
            row["requests"], row["prompt_tokens"] or 0, row["completion_tokens"] or 0)
    ends_at = period_reset_at(team.timezone, start)
    members = (Member.objects.filter(team=team)
               .filter(pk__in=list(by_member)) | Member.objects.filter(team=team, is_active=True,
                                                                       created_at__lt=ends_at))
    members = members.select_related("user").order_by("pk")
    limits = {c["member_id"]: c for c in QuotaCounter.objects.filter(member__team=team, period_start=start)
              .values("member_id", "request_limit", "token_limit")}
    billed = []
    for member in members:
        counter = limits.get(member.pk)
        usage = by_member.get(member.pk, {})
        billed.append(BilledMember(member, MemberMonth(
            member_id=member.pk, by_model=usage,
            request_quota=counter["request_limit"] if counter else member.request_quota,
            token_quota=counter["token_limit"] if counter else member.token_quota,
            active_days=active_days(team=team, start=start, joined_at=member.created_at, used=bool(usage)),
        )))
    return billed


# --- the month so far, and a closed month ------------------------------------------------

@dataclass(frozen=True)
class ShareRow:
    member_id: int
    username: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    amount: Decimal
    share: Decimal  # amount ÷ cost, display only
    number: str = ""


@dataclass
class CostReport:
    team: Team
    start: date
    status: str  # the period's status, "open" for a month not closed yet
    projected: bool  # True: the month so far under today's policy and cost; False: the stored invoices
    currency: str
    cost: Decimal
    policy: str
    explanation: str
    idle: Decimal
    unallocated: Decimal
    fell_back: bool
    rows: list[ShareRow] = field(default_factory=list)
    explained: Explanation | None = None  # None: a period closed before explanations were stored

    @property
    def allocated(self) -> Decimal:
        return sum((r.amount for r in self.rows), ZERO)

    @property
    def explanation_text(self) -> str:
        """The explanation in the active language."""
        return self.explained.translated() if self.explained else self.explanation

    @property
    def policy_name(self) -> str:
        return policy_name(self.policy)


def share_of(amount: Decimal, cost: Decimal) -> Decimal:
    """amount ÷ cost with 8 decimals, for display (percent labels) only."""
    return (amount / cost).quantize(Decimal("0.00000001")) if cost else Decimal(0)


def period_split(*, team: Team, start: date, cost: Decimal, params: PolicyParams,
                 rolled: bool = False) -> tuple[list[BilledMember], Split]:
    """The members of the period and the split of `cost` among them: what the close writes and the report projects.

    The close reads the rows themselves; the report may read the days rolled up (rolled=True, period_usage).
    """
    billed = period_billed_members(team=team, start=start, rolled=rolled)
    split = split_cost(quantize(Decimal(str(cost)), team.currency), [b.month for b in billed], params, team.currency)
    return billed, split


def cost_report(*, team: Team, start: date) -> CostReport:
    """The month's usage and shares: the stored invoices once closed, else projected with the close's own code."""
    period = period_get(team=team, start=start)
    if period is not None and period.status != BillingPeriod.Status.OPEN:
        return _closed_report(period)
    cost = quantize(Decimal(str(team.monthly_cost)), team.currency)
    billed, split = period_split(team=team, start=start, cost=cost,
                                 params=policy_params(billing_policy_for_team(team=team)), rolled=True)
    rows = [ShareRow(b.member.pk, b.member.user.get_username(), b.month.requests,
                     sum(u.prompt_tokens for u in b.month.by_model.values()),
                     sum(u.completion_tokens for u in b.month.by_model.values()),
                     split.amounts[b.member.pk], share_of(split.amounts[b.member.pk], cost)) for b in billed]
    return CostReport(team, start, BillingPeriod.Status.OPEN, True, team.currency, cost, split.policy,
                      split.explanation, split.idle, split.unallocated, split.fell_back, rows, split.explained)


def _closed_report(period: BillingPeriod) -> CostReport:
    totals = {r["invoice_id"]: r for r in InvoiceLine.objects.filter(
        invoice__period=period, kind=InvoiceLine.Kind.USAGE).values("invoice_id").annotate(
        requests=Sum("requests"), prompt_tokens=Sum("prompt_tokens"), completion_tokens=Sum("completion_tokens"))}
    rows = []
    for invoice in period.invoices.select_related("member__user").order_by("member_id"):
        t = totals.get(invoice.pk, {})
        rows.append(ShareRow(invoice.member_id, invoice.member.user.get_username(), t.get("requests") or 0,
                             t.get("prompt_tokens") or 0, t.get("completion_tokens") or 0, invoice.allocated,
                             invoice.share, invoice.number or ""))
    return CostReport(period.team, period.start, period.status, False, period.currency, period.cost,
                      period.applied_policy, period.explanation, period.idle, period.unallocated, period.fell_back,
                      rows, Explanation.from_json(period.explanation_parts))


# --- reconciliation ---------------------------------------------------------------------

@dataclass
class Reconciliation:
    """The period's counted usage rows against its invoices' usage lines, per member × model."""

    usage: dict[tuple[int, str], tuple[int, int, int]]  # (member, model) → (requests, prompt, completion)
    invoiced: dict[tuple[int, str], tuple[int, int, int]]
    invoices_per_member: dict[int, int]

    @property
    def mismatches(self) -> list[tuple[int, str]]:
        return sorted(k for k in self.usage.keys() | self.invoiced.keys()
                      if self.usage.get(k, (0, 0, 0)) != self.invoiced.get(k, (0, 0, 0)))

    @property
    def ok(self) -> bool:
        every_user_once = all(self.invoices_per_member.get(m) == 1 for m, _ in self.usage)
        return not self.mismatches and every_user_once and all(n == 1 for n in self.invoices_per_member.values())


def period_reconciliation(*, period: BillingPeriod) -> Reconciliation:
    """Compare the usage rows of a closed period with its invoices (three queries)."""
    usage = {(r["member_id"], r["model"]): (r["requests"], r["prompt_tokens"] or 0, r["completion_tokens"] or 0)
             for r in period_usage(team=period.team, start=period.start)}
    invoiced = {(r["invoice__member_id"], r["model"]): (r["requests"], r["prompt_tokens"], r["completion_tokens"])
                for r in InvoiceLine.objects.filter(invoice__period=period, kind=InvoiceLine.Kind.USAGE)
                .values("invoice__member_id", "model")
                .annotate(requests=Sum("requests"), prompt_tokens=Sum("prompt_tokens"),
                          completion_tokens=Sum("completion_tokens")).order_by()}
    per_member = {r["member_id"]: r["n"] for r in
                  Invoice.objects.filter(period=period).values("member_id").annotate(n=Count("id")).order_by()}
    return Reconciliation(usage, invoiced, per_member)


# --- one invoice, as a statement shows it -----------------------------------------------

@dataclass(frozen=True)
class InvoiceDetail:
    invoice: Invoice
    lines: list
    tokens: int  # prompt + completion tokens of the usage lines
    effective_price: Decimal | None  # the member's allocated amount per 1M tokens under the policy
    public_price_amount: Decimal | None  # the same tokens at the team's public API prices (None: no price set)


def invoice_detail(*, invoice: Invoice) -> InvoiceDetail:
    """An invoice with its lines and both views of the price (two queries)."""
    invoice = Invoice.objects.select_related("period", "member__user").get(pk=invoice.pk)
    lines = list(invoice.lines.order_by("kind", "model", "pk"))
    usage_lines = [line for line in lines if line.kind == InvoiceLine.Kind.USAGE]
    tokens = sum(line.prompt_tokens + line.completion_tokens for line in usage_lines)
    priced = [line.public_price_amount for line in usage_lines if line.public_price_amount is not None]
    effective = ((invoice.allocated * 1_000_000 / tokens).quantize(Decimal(1).scaleb(-PRICE_PLACES))
                 if tokens else None)
    return InvoiceDetail(invoice, lines, tokens, effective, sum(priced, ZERO) if priced else None)


# --- statements (billing.services.statements) -------------------------------------------

def invoice_get_by_number(*, number: str) -> list[Invoice]:
    """The issued invoices numbered `number` (numbers are unique per team; a list, so callers can refuse a clash)."""
    return list(Invoice.objects.select_related("period__team", "member__user").filter(number=number.strip())[:2])


def statement_usage_by_day(*, invoice: Invoice):
    """The member's counted usage of the invoice's month per day (team's time zone) × model, in SQL (one query)."""
    period = invoice.period
    tz = zoneinfo.ZoneInfo(period.team.timezone)
    return (UsageRecord.objects.filter(team_id=period.team_id, member_id=invoice.member_id,
                                       period_start=period.start, status__in=BILLED_STATUSES)
            .annotate(day=TruncDate("started_at", tzinfo=tz))
            .values("day", "model")
            .annotate(requests=Count("id"), prompt_tokens=Sum("prompt_tokens"),
                      completion_tokens=Sum("completion_tokens"))
            .order_by("day", "model"))


def period_invoices_for_summary(*, period: BillingPeriod) -> list[Invoice]:
    """The period's invoices with their members, by number (the admins' summary; one query)."""
    return list(period.invoices.select_related("member__user").order_by("sequence", "member_id"))


def team_admin_addresses(*, team: Team) -> list[str]:
    """The e-mail addresses of the team's active admins, sorted, without duplicates."""
    emails = (Member.objects.filter(team=team, role=Member.Role.ADMIN, is_active=True)
              .exclude(user__email="").values_list("user__email", flat=True))
    return sorted(set(emails))


def statement_periods_pending():
    """Finalized periods whose outbox still has statements to send (a retry after an SMTP failure)."""
    return (BillingPeriod.objects.filter(status=BillingPeriod.Status.FINALIZED,
                                         statement_emails__status=StatementEmail.Status.PENDING)
            .distinct().order_by("start", "pk"))
