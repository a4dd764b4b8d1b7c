from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand

from billing.management.months import parse_month
from billing.models import BillingPeriod
from billing.selectors import period_get
from billing.services import PERIOD_OPEN, period_finalize
from tenants.management.base import service_errors
from tenants.services import team_get


class Command(BaseCommand):
    help = ("Finalize a closed month: number its invoices (per team, without gaps) and issue them. "
            "Safe to run again: a finalized month is left as it is.")

    def add_arguments(self, parser):
        parser.add_argument("team", help="Team slug.")
        parser.add_argument("--month", help="YYYY-MM, in the team's time zone (default: the month before this one).")

    def handle(self, *args, team, month, **options):
        with service_errors():
            team_obj = team_get(slug=team)
            start = parse_month(month, team=team_obj, default="previous")
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
