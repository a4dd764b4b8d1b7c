"""A period's split as a FinOps FOCUS CSV: one row per invoice line, FOCUS column names.

For finance offices that import cost data in the FOCUS format (FinOps Open Cost and Usage
Specification). Dates are the period's bounds in UTC (FOCUS datetimes are UTC, the end
exclusive); costs are the stored line amounts (what the member pays: BilledCost =
EffectiveCost, nothing is amortized); the member and the invoice are in Tags (JSON).
Usage lines consume tokens; the fixed part (`base`), the idle capacity (`idle`) and
corrections of earlier months (`adjustment`, ChargeClass "Correction") consume nothing.
"""
import csv
import json
from datetime import timezone as dt_timezone

from billing.models import BillingPeriod, InvoiceLine
from billing.money import quantize
from billing.selectors import period_starts_at
from tenants.periods import next_period_start

COLUMNS = [
    "BillingAccountId", "BillingAccountName", "BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart",
    "ChargePeriodEnd", "ChargeCategory", "ChargeClass", "ChargeDescription", "BilledCost", "EffectiveCost",
    "BillingCurrency", "ConsumedQuantity", "ConsumedUnit", "InvoiceId", "Tags",
]
_CATEGORY = {InvoiceLine.Kind.USAGE: "Usage", InvoiceLine.Kind.BASE: "Usage", InvoiceLine.Kind.IDLE: "Usage",
             InvoiceLine.Kind.ADJUSTMENT: "Adjustment"}


def _utc(dt) -> str:
    return dt.astimezone(dt_timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _description(line: InvoiceLine) -> str:
    if line.kind == InvoiceLine.Kind.USAGE:
        requests = "1 request" if line.requests == 1 else f"{line.requests} requests"
        return (f"{line.model}: {requests}, {line.prompt_tokens} prompt and "
                f"{line.completion_tokens} completion tokens")
    if line.kind == InvoiceLine.Kind.BASE:
        return "Fixed share of the month's GPU cost"
    if line.kind == InvoiceLine.Kind.IDLE:
        return "Idle capacity of the month (nobody's usage)"
    return f"Correction of {line.model}: {line.reason}" if line.model else f"Correction: {line.reason}"


def focus_rows(*, period: BillingPeriod) -> list[dict]:
    """The period's invoice lines as FOCUS rows, by invoice and line (one query for the lines)."""
    team = period.team
    start = _utc(period_starts_at(team=team, start=period.start))
    end = _utc(period_starts_at(team=team, start=next_period_start(period.start)))
    lines = (InvoiceLine.objects.filter(invoice__period=period)
             .select_related("invoice__member__user").order_by("invoice__member_id", "kind", "model", "pk"))
    rows = []
    for line in lines:
        invoice = line.invoice
        cost = str(quantize(line.amount, period.currency))
        usage = line.kind == InvoiceLine.Kind.USAGE
        rows.append({
            "BillingAccountId": team.slug, "BillingAccountName": team.name,
            "BillingPeriodStart": start, "BillingPeriodEnd": end, "ChargePeriodStart": start, "ChargePeriodEnd": end,
            "ChargeCategory": _CATEGORY[line.kind],
            "ChargeClass": "Correction" if line.kind == InvoiceLine.Kind.ADJUSTMENT else "",
            "ChargeDescription": _description(line), "BilledCost": cost, "EffectiveCost": cost,
            "BillingCurrency": period.currency,
            "ConsumedQuantity": str(line.prompt_tokens + line.completion_tokens) if usage else "",
            "ConsumedUnit": "Tokens" if usage else "",
            "InvoiceId": invoice.number or "",
            "Tags": json.dumps({"member": invoice.member.user.get_username(), "member_id": invoice.member_id,
                                "line": line.kind, **({"model": line.model} if usage else {})},
                               ensure_ascii=False, sort_keys=True),
        })
    return rows


def focus_csv_write(*, period: BillingPeriod, out) -> int:
    """Write the period's FOCUS CSV to the text stream `out`; return the number of rows."""
    rows = focus_rows(period=period)
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return len(rows)
