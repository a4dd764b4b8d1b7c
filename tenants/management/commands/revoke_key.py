from django.core.management.base import BaseCommand, CommandError

from tenants.management.base import REASON_MAX, service_errors
from tenants.services import api_key_get_by_prefix, api_key_revoke


class Command(BaseCommand):
    help = "Revoke an API key, named by the start of its prefix (as shown in lists). Gateways refuse it within seconds."

    def add_arguments(self, parser):
        parser.add_argument("prefix", help="The key's display prefix (or enough of it to name one key).")
        parser.add_argument("--reason", default="", help="Why, for the audit trail.")

    def handle(self, *args, prefix, reason, **options):
        if len(reason) > REASON_MAX:
            raise CommandError(f"--reason is too long: at most {REASON_MAX} characters.")
        with service_errors():
            key = api_key_revoke(key=api_key_get_by_prefix(prefix=prefix), reason=reason)
        self.stdout.write(f"Revoked key {key.prefix}… ({key.label or 'no label'}) of {key.member}.")
