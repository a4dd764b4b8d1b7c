from django.core.exceptions import ValidationError

from billing.management.months import MonthCommand
from billing.models import BillingPeriod
from billing.selectors import period_get
from billing.services import PERIOD_OPEN, period_finalize
from tenants.management.base import service_errors


class Command(MonthCommand):
    help = ("Finalize a closed month: number its invoices (per team, without gaps) and issue them. "
            "Safe to run again: a finalized month is left as it is.")

    def handle(self, *args, team, month, **options):
        with service_errors():
            team_obj, start = self.team_and_month(team, month)
            period = period_get(team=team_obj, start=start)
            if period is None:
                raise ValidationError(PERIOD_OPEN.format(team=team_obj.slug, month=f"{start:%Y-%m}"))
            was = period.status
            period = period_finalize(period=period)
        label = f"{team_obj.slug} {start:%Y-%m}"
        if was == BillingPeriod.Status.FINALIZED:
            self.stdout.write(f"{label} was already finalized: nothing changed.")
            return
        numbers = list(period.invoices.order_by("sequence").values_list("number", flat=True))
        issued = f"{numbers[0]} … {numbers[-1]}" if numbers else "none"
        self.stdout.write(f"Finalized {label}: {len(numbers)} invoice(s) issued ({issued}).")
