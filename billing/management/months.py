"""What the billing commands share: the TEAM and --month arguments, checked before any service runs."""
import re
from datetime import date

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand
from django.utils import timezone

from billing.selectors import current_period_start
from tenants.models import Team
from tenants.periods import next_period_start
from tenants.services import team_get

MONTH_MALFORMED = "--month must be a month such as 2026-11 (YYYY-MM), not {value!r}."
MONTH_FUTURE = "{month} has not begun yet in {team}'s time zone ({tz}): it is {today:%Y-%m} there."


def previous_period_start(start: date) -> date:
    return date(start.year - (start.month == 1), (start.month - 2) % 12 + 1, 1)


def parse_month(value: str | None, *, team: Team, default: str) -> date:
    """Return the first day of --month; without it the team's current month or the one before (`default`)."""
    current = current_period_start(team=team, now=timezone.now())
    if value is None:
        return current if default == "current" else previous_period_start(current)
    match = re.fullmatch(r"(\d{4})-(\d{2})", value.strip())
    if not match or not 1 <= int(match[2]) <= 12:
        raise ValidationError(MONTH_MALFORMED.format(value=value))
    start = date(int(match[1]), int(match[2]), 1)
    if start >= next_period_start(current):
        raise ValidationError(MONTH_FUTURE.format(month=f"{start:%Y-%m}", team=team.slug, tz=team.timezone,
                                                  today=current))
    return start


class MonthCommand(BaseCommand):
    """A command about one team's month: TEAM and --month (the team's current month or the one before)."""

    default_month = "previous"

    def add_arguments(self, parser):
        parser.add_argument("team", help="Team slug.")
        default = "this month" if self.default_month == "current" else "the month before this one"
        parser.add_argument("--month", help=f"YYYY-MM, in the team's time zone (default: {default}).")

    def team_and_month(self, team: str, month: str | None) -> tuple[Team, date]:
        """The team and the month's first day; ValidationError (a clear message) for bad input."""
        team_obj = team_get(slug=team)
        return team_obj, parse_month(month, team=team_obj, default=self.default_month)
