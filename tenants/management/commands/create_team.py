from django.core.management.base import BaseCommand

from tenants.management.base import service_errors
from tenants.services import team_create


class Command(BaseCommand):
    help = "Create a team: its slug, name, monthly cost, currency and time zone (billing months follow it)."

    def add_arguments(self, parser):
        parser.add_argument("slug", help="Short identifier used in commands and URLs, e.g. nlp-lab.")
        parser.add_argument("--name", help="Display name (default: the slug).")
        parser.add_argument("--monthly-cost", default="0",
                            help="Fixed monthly cost shared by the members, e.g. 3000 or 2999.50 (default 0).")
        parser.add_argument("--currency", default="CNY", help="ISO 4217 code, e.g. CNY, USD, EUR (default CNY).")
        parser.add_argument("--timezone", default="UTC",
                            help="IANA time zone the team's months start in, e.g. Asia/Shanghai (default UTC).")

    def handle(self, *args, slug, name, monthly_cost, currency, timezone, **options):
        with service_errors():
            team = team_create(slug=slug, name=name or slug, monthly_cost=monthly_cost,
                               currency=currency, timezone_name=timezone)
        team.refresh_from_db()  # the stored, rounded cost
        self.stdout.write(
            f"Created team {team.slug} ({team.name}): {team.monthly_cost} {team.currency}/month, "
            f"months start in {team.timezone}."
        )
