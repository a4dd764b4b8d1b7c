from billing.management.months import MonthCommand
from billing.models import BillingPeriod
from billing.money import quantize
from billing.selectors import period_get
from billing.services import period_close
from tenants.management.base import service_errors


class Command(MonthCommand):
    help = (
        "Close a team's month: wait (up to QWENHUB_UPSTREAM_TIMEOUT) for requests still streaming, open next "
        "month's quota counters and write one draft invoice per member. Safe to run again: a closed month is "
        "left as it is."
    )

    def handle(self, *args, team, month, **options):
        with service_errors():
            team_obj, start = self.team_and_month(team, month)
            before = period_get(team=team_obj, start=start)
            period = period_close(team=team_obj, start=start)
        label = f"{team_obj.slug} {start:%Y-%m}"
        if before is not None and before.status != BillingPeriod.Status.OPEN:
            self.stdout.write(f"{label} was already {period.status}: nothing changed.")
            return
        cost = quantize(period.cost, period.currency)
        self.stdout.write(f"Closed {label}: {period.invoices.count()} draft invoice(s), {cost} {period.currency} "
                          f"split by {period.applied_policy}. {period.explanation}")
        if period.unallocated:
            self.stdout.write(f"Unallocated: {quantize(period.unallocated, period.currency)} {period.currency}.")
        for row in period.released_reservations:
            who = f"member {row['member_id']}" if row.get("member_id") else "the team's cap"
            self.stdout.write(self.style.WARNING(
                f"Released a stuck reservation of {who}: {row['requests']} request(s), {row['tokens']} tokens."))
