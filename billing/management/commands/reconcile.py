"""`manage.py reconcile TEAM [--month YYYY-MM] [--metrics-url URL --baseline FILE | --save-baseline FILE]`.

Compares the team's quota counters of the month with its usage rows and reservations and,
given an upstream's /metrics, vLLM's generated tokens since a baseline scrape with the usage
rows' completion tokens (billing.reconcile). Prints every mismatch; exits 1 if there is one.
"""
from datetime import date
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from billing import reconcile
from tenants.models import Team
from tenants.periods import period_start_for


def _month(value: str) -> date:
    try:
        year, month = (int(part) for part in value.split("-"))
        return date(year, month, 1)
    except ValueError:
        raise CommandError(f"--month must be YYYY-MM, not {value!r}.") from None


class Command(BaseCommand):
    help = "Check that quota counters (and an upstream's metrics) agree with the usage rows; exit 1 if not."

    def add_arguments(self, parser):
        parser.add_argument("team", help="the team's slug")
        parser.add_argument("--month", type=_month, help="YYYY-MM (default: the team's current month)")
        parser.add_argument("--metrics-url", help="an upstream's /metrics, e.g. http://vllm:8000/metrics")
        parser.add_argument("--metrics-token", default="", help="bearer token for --metrics-url, if it needs one")
        parser.add_argument("--upstream", default="", help="only usage rows of this upstream (its name)")
        parser.add_argument("--baseline", type=Path, help="a scrape saved earlier with --save-baseline: compare "
                                                          "the tokens generated since then")
        parser.add_argument("--save-baseline", type=Path, help="save this scrape as the next baseline")
        parser.add_argument("--tolerance", type=int, default=0, help="tokens the upstream may differ by")

    def handle(self, *args, **options):
        team = Team.objects.filter(slug=options["team"]).first()
        if team is None:
            raise CommandError(f"No team {options['team']!r}.")
        start = options["month"] or period_start_for(team.timezone)
        if (options["baseline"] or options["save_baseline"]) and not options["metrics_url"]:
            raise CommandError("--baseline and --save-baseline need --metrics-url.")
        mismatches = reconcile.counters_reconcile(team=team, start=start)
        if options["metrics_url"]:
            try:
                scrape = reconcile.metrics_scrape(options["metrics_url"], token=options["metrics_token"])
            except OSError as exc:
                raise CommandError(f"Could not scrape {options['metrics_url']}: {exc}") from None
            if options["baseline"]:
                mismatches += reconcile.upstream_reconcile(
                    baseline=reconcile.metrics_baseline_load(options["baseline"]), now=scrape,
                    upstream=options["upstream"], tolerance=options["tolerance"])
            if options["save_baseline"]:
                reconcile.metrics_baseline_save(options["save_baseline"], scrape)
                self.stdout.write(f"Baseline saved to {options['save_baseline']}: "
                                  f"{scrape['generation_tokens']} tokens generated at {scrape['at']}.")
        for mismatch in mismatches:
            self.stdout.write(f"MISMATCH {mismatch}")
        if mismatches:
            raise CommandError(f"{len(mismatches)} mismatch(es) for {team.slug} {start:%Y-%m}.", returncode=1)
        self.stdout.write(f"{team.slug} {start:%Y-%m}: the counters agree with the usage rows.")
