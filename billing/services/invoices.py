"""Writes for invoices: the drafts a close (or a cost correction) writes, and adjustments after finalize.

WARNING: the lines written here are what members pay; a change alters future invoices
(finalized ones are never rewritten).
"""
from dataclasses import dataclass
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from billing.models import BillingPeriod, Invoice, InvoiceAdjustment, InvoiceLine
from billing.money import ZERO, minor_unit, quantize
from billing.policies import SEED_RATE, MemberMonth, ModelUsage, PolicyParams, Split, split_by_model, usage_weight
from billing.selectors import share_of
from billing.services.audit import INVOICE_ADJUSTED, billing_audit
from tenants.periods import next_period_start

INVOICE_NOT_FINALIZED = ("Invoice of {member} for {month} is still a draft: correct the month's cost "
                         "(period_set_actual_cost) instead of adjusting it.")
ADJUSTMENT_INVALID = ("An adjustment must be a non-zero amount in {currency}'s minor unit ({unit}), "
                      "e.g. 12.50 or -12.50 for a credit.")
REASON_REQUIRED = "Say why: a correction needs a reason (it is printed on the invoice)."
NO_LATER_PERIOD = "No later month of {team} is open for the adjustment yet."
MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Draft:
    """Everything the drafts of a period are written from (the close's aggregation, or the stored invoices)."""

    months: list[MemberMonth]
    split: Split
    params: PolicyParams
    public_prices: dict


def _public_amount(prices: dict, model: str, usage: ModelUsage, currency: str) -> Decimal | None:
    price = prices.get(model)
    if not price:
        return None
    exact = (usage.prompt_tokens * Decimal(str(price.get("prompt", 0)))
             + usage.completion_tokens * Decimal(str(price.get("completion", 0)))) / MILLION
    return quantize(exact, currency)


def _lines(month: MemberMonth, amount: Decimal, draft: Draft, currency: str) -> list[InvoiceLine]:
    """The member's amount as lines: idle capacity (seed_rate's payer), per model, or one fixed part."""
    lines = []
    split, params = draft.split, draft.params
    rest = amount
    if split.policy == SEED_RATE and params.idle_payer_id == month.member_id and split.idle and not split.unallocated:
        idle = min(split.idle, amount)
        lines.append(InvoiceLine(kind=InvoiceLine.Kind.IDLE, amount=idle))
        rest = amount - idle
    parts = split_by_model(rest, month, params, currency)
    for model, usage in sorted(month.by_model.items()):
        lines.append(InvoiceLine(
            kind=InvoiceLine.Kind.USAGE, model=model, requests=usage.requests, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, model_weight=params.model_weights.get(model, Decimal(1)),
            weighted_tokens=usage_weight(usage, model, params), amount=parts.get(model, ZERO * minor_unit(currency)),
            public_price_amount=_public_amount(draft.public_prices, model, usage, currency)))
    if rest and not parts:
        lines.append(InvoiceLine(kind=InvoiceLine.Kind.BASE, amount=rest))
    return lines


def _adjustment_line(adjustment: InvoiceAdjustment) -> InvoiceLine:
    return InvoiceLine(kind=InvoiceLine.Kind.ADJUSTMENT, adjustment=adjustment, amount=adjustment.amount,
                       reason=adjustment.reason, model=adjustment.corrects.number or "")


@transaction.atomic
def invoices_write_drafts(*, period: BillingPeriod, draft: Draft) -> list[Invoice]:
    """Write (or rewrite) the period's draft invoices and lines from a split; the period row is locked by the caller.

    One invoice per member split, plus one for a member who is not but has an adjustment
    billed this month. Usage, idle and base lines are rewritten; adjustment lines are kept
    and added once each (their OneToOne to the adjustment forbids a second).
    """
    if period.status == BillingPeriod.Status.FINALIZED:
        raise RuntimeError(f"{period} is finalized: its invoices are issued and never rewritten")
    currency, cost = period.currency, period.cost
    months = {m.member_id: m for m in draft.months}
    adjustments = list(InvoiceAdjustment.objects.filter(period=period).select_related("corrects").order_by("pk"))
    for adj in adjustments:
        # Not part of the split: weighs nothing under every policy (no days, no quota, no usage).
        months.setdefault(adj.member_id, MemberMonth(adj.member_id, {}, request_quota=0, token_quota=0, active_days=0))
    existing = {inv.member_id: inv for inv in Invoice.objects.filter(period=period)}
    adjusted = {m: Decimal(0) for m in months}
    for adj in adjustments:
        adjusted[adj.member_id] += adj.amount
    zero = ZERO * minor_unit(currency)
    new, changed = [], []
    for member_id, month in sorted(months.items()):
        allocated = draft.split.amounts.get(member_id, zero)
        values = {"allocated": allocated, "amount": allocated + adjusted[member_id], "share": share_of(allocated, cost),
                  "active_days": month.active_days, "request_quota": month.request_quota,
                  "token_quota": month.token_quota}
        invoice = existing.get(member_id)
        if invoice is None:
            new.append(Invoice(period=period, team_id=period.team_id, member_id=member_id, **values))
        else:
            for name, value in {**values, "updated_at": timezone.now()}.items():
                setattr(invoice, name, value)
            changed.append(invoice)
    Invoice.objects.bulk_create(new)
    if changed:
        Invoice.objects.bulk_update(changed, ["allocated", "amount", "share", "active_days", "request_quota",
                                              "token_quota", "updated_at"])
    invoices = {inv.member_id: inv for inv in [*new, *changed]}
    InvoiceLine.objects.filter(invoice__period=period).exclude(kind=InvoiceLine.Kind.ADJUSTMENT).delete()
    lines = []
    for member_id, month in sorted(months.items()):
        for line in _lines(month, invoices[member_id].allocated, draft, currency):
            line.invoice = invoices[member_id]
            lines.append(line)
    have = set(InvoiceLine.objects.filter(invoice__period=period, adjustment__isnull=False)
               .values_list("adjustment_id", flat=True))
    for adj in adjustments:
        if adj.pk not in have:
            line = _adjustment_line(adj)
            line.invoice = invoices[adj.member_id]
            lines.append(line)
    InvoiceLine.objects.bulk_create(lines)
    return sorted(invoices.values(), key=lambda inv: inv.member_id)


def invoice_months(*, period: BillingPeriod) -> list[MemberMonth]:
    """The split's inputs as the close stored them (usage lines, active days, quotas), for a recompute."""
    usage: dict[int, dict[str, ModelUsage]] = {}
    for line in InvoiceLine.objects.filter(invoice__period=period, kind=InvoiceLine.Kind.USAGE).values(
            "invoice_id", "model", "requests", "prompt_tokens", "completion_tokens"):
        usage.setdefault(line["invoice_id"], {})[line["model"]] = ModelUsage(
            line["requests"], line["prompt_tokens"], line["completion_tokens"])
    return [MemberMonth(inv.member_id, usage.get(inv.pk, {}), request_quota=inv.request_quota,
                        token_quota=inv.token_quota, active_days=inv.active_days)
            for inv in Invoice.objects.filter(period=period).order_by("member_id")]


def _adjustment_amount(amount, currency: str) -> Decimal:
    try:
        value = Decimal(str(amount))
    except ArithmeticError:
        value = None
    if value is None or not value.is_finite() or value == 0 or value != quantize(value, currency):
        raise ValidationError(ADJUSTMENT_INVALID.format(currency=currency, unit=minor_unit(currency)))
    return value


@transaction.atomic(durable=True)
def invoice_adjust(*, invoice: Invoice, amount, reason: str, actor=None) -> InvoiceAdjustment:
    """Correct a finalized invoice: an adjustment line with the reason on the member's next unfinalized month.

    The target is the first month after the invoice's whose period is not finalized; its period
    row is created (open) if the month has none yet. If that period is closed, the line is
    written at once; if it is open, its close writes it. Each call is one more correction.
    """
    period = invoice.period
    if period.status != BillingPeriod.Status.FINALIZED:
        raise ValidationError(INVOICE_NOT_FINALIZED.format(member=invoice.member, month=f"{period.start:%Y-%m}"))
    if not reason or not reason.strip():
        raise ValidationError(REASON_REQUIRED)
    value = _adjustment_amount(amount, period.currency)
    start = next_period_start(period.start)
    while True:
        target, _ = BillingPeriod.objects.get_or_create(team_id=period.team_id, start=start,
                                                        defaults={"currency": period.currency})
        target = BillingPeriod.objects.select_for_update(no_key=True).get(pk=target.pk)
        if target.status != BillingPeriod.Status.FINALIZED:
            break
        start = next_period_start(start)
    adjustment = InvoiceAdjustment.objects.create(team_id=period.team_id, member_id=invoice.member_id,
                                                  corrects=invoice, period=target, amount=value,
                                                  reason=reason.strip(), actor=actor)
    if target.status == BillingPeriod.Status.CLOSED:
        target_invoice, _ = Invoice.objects.get_or_create(
            period=target, member_id=invoice.member_id,
            defaults={"team_id": period.team_id, "allocated": ZERO * minor_unit(target.currency), "amount": 0,
                      "active_days": 0, "request_quota": 0, "token_quota": 0})
        line = _adjustment_line(adjustment)
        line.invoice = target_invoice
        line.save()
        total = target_invoice.lines.aggregate(total=Sum("amount"))["total"]
        Invoice.objects.filter(pk=target_invoice.pk).update(amount=total)
    billing_audit(action=INVOICE_ADJUSTED, team=invoice.team, member=invoice.member, actor=actor,
                  subject_id=adjustment.pk, reason=adjustment.reason,
                  data={"invoice": invoice.number, "amount": str(value), "billed_in": f"{target.start:%Y-%m}"})
    return adjustment
