from django.core.management.base import BaseCommand

from tenants.management.base import positive_int, service_errors
from tenants.services import api_key_issue, member_get


class Command(BaseCommand):
    help = (
        "Issue a new API key for a member. Prints only the key on stdout: it is shown "
        "this once and never stored (only its hash is)."
    )

    def add_arguments(self, parser):
        parser.add_argument("username", help="The member's user name.")
        parser.add_argument("--team", help="Team slug, needed when the user belongs to several teams.")
        parser.add_argument("--label", default="", help="A note to tell keys apart, e.g. laptop or ci.")
        parser.add_argument("--expires-days", type=positive_int, default=None,
                            help="Days until the key stops working (default: never).")

    def handle(self, *args, username, team, label, expires_days, **options):
        with service_errors():
            key, raw = api_key_issue(member=member_get(username=username, team_slug=team), label=label,
                                     expires_days=expires_days)
        # stdout carries the key alone so scripts can capture it: KEY=$(manage.py create_key alice)
        self.stdout.write(raw)
        self.stderr.write(f"Issued key {key.prefix}… for {key.member}; store it now, it is not shown again.")
