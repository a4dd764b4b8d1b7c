from django.core.exceptions import ValidationError

from billing.focus import focus_csv_write
from billing.management.months import MonthCommand
from billing.models import BillingPeriod
from billing.selectors import period_get
from billing.services import PERIOD_OPEN
from tenants.management.base import service_errors


class Command(MonthCommand):
    help = ("A closed month's split as CSV in the FinOps FOCUS column names (one row per invoice line), "
            "for a finance office. Writes to stdout.")

    def handle(self, *args, team, month, **options):
        with service_errors():
            team_obj, start = self.team_and_month(team, month)
            period = period_get(team=team_obj, start=start)
            if period is None or period.status == BillingPeriod.Status.OPEN:
                raise ValidationError(PERIOD_OPEN.format(team=team_obj.slug, month=f"{start:%Y-%m}"))
        if period.status != BillingPeriod.Status.FINALIZED:
            self.stderr.write(f"{team_obj.slug} {start:%Y-%m} is closed but not finalized: these are drafts.")
        focus_csv_write(period=period, out=self.stdout)
