import csv
import json
from decimal import Decimal

from billing.management.months import MonthCommand
from billing.money import quantize
from billing.selectors import cost_report
from tenants.management.base import service_errors

COLUMNS = ["member", "requests", "prompt_tokens", "completion_tokens", "amount", "share_percent", "invoice"]


def _percent(share: Decimal) -> str:
    return str((share * 100).quantize(Decimal("0.01")))  # display only


class Command(MonthCommand):
    help = ("The month so far: each member's usage and projected share of the team's cost under the team's "
            "policy (for a closed month, its invoices).")

    default_month = "current"

    def add_arguments(self, parser):
        super().add_arguments(parser)
        parser.add_argument("--format", choices=["table", "csv", "json"], default="table")

    def handle(self, *args, team, month, format, **options):
        with service_errors():
            team_obj, start = self.team_and_month(team, month)
            report = cost_report(team=team_obj, start=start)
        money = lambda amount: str(quantize(amount, report.currency))  # noqa: E731
        rows = [{"member": r.username, "requests": r.requests, "prompt_tokens": r.prompt_tokens,
                 "completion_tokens": r.completion_tokens, "amount": money(r.amount),
                 "share_percent": _percent(r.share), "invoice": r.number} for r in report.rows]
        if format == "csv":
            writer = csv.DictWriter(self.stdout, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            return
        summary = {"team": team_obj.slug, "month": f"{start:%Y-%m}", "status": report.status,
                   "projected": report.projected, "currency": report.currency, "cost": money(report.cost),
                   "policy": report.policy, "explanation": report.explanation, "allocated": money(report.allocated),
                   "idle": money(report.idle), "unallocated": money(report.unallocated),
                   "fell_back": report.fell_back}
        if format == "json":
            self.stdout.write(json.dumps({**summary, "members": rows}, indent=2, ensure_ascii=False))
            return
        what = "projected so far" if report.projected else f"{report.status}"
        self.stdout.write(f"{team_obj.slug} {start:%Y-%m} ({what}): {summary['cost']} {report.currency}, "
                          f"policy {report.policy}")
        self.stdout.write(report.explanation)
        widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in COLUMNS}
        self.stdout.write("  ".join(c.ljust(widths[c]) for c in COLUMNS).rstrip())
        for r in rows:
            self.stdout.write("  ".join(
                (str(r[c]).ljust if c in ("member", "invoice") else str(r[c]).rjust)(widths[c]) for c in COLUMNS
            ).rstrip())
        self.stdout.write(f"allocated {summary['allocated']}, idle {summary['idle']}, "
                          f"unallocated {summary['unallocated']} {report.currency}")
