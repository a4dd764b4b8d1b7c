from django.core.management.base import BaseCommand, CommandError

from tenants.management.base import REASON_MAX, limit_text, positive_int, service_errors
from tenants.services import member_get, quota_reset, quota_top_up


class Command(BaseCommand):
    help = (
        "Top up or reset a member's quota for the current month (the team's calendar month). "
        "Next month starts again from the member's own quotas."
    )

    def add_arguments(self, parser):
        parser.add_argument("username", help="The member's user name.")
        parser.add_argument("--team", help="Team slug, needed when the user belongs to several teams.")
        action = parser.add_mutually_exclusive_group(required=True)
        action.add_argument("--top-up-requests", type=positive_int, metavar="N",
                            help="Add N requests to this month's limit.")
        action.add_argument("--top-up-tokens", type=positive_int, metavar="N",
                            help="Add N tokens to this month's limit.")
        action.add_argument("--reset", action="store_true",
                            help="Give a full fresh allowance: limits become used + the member's quotas.")
        parser.add_argument("--reason", required=True, help="Why, for the audit trail.")

    def handle(self, *args, username, team, top_up_requests, top_up_tokens, reset, reason, **options):
        if not reason.strip():
            raise CommandError("--reason must not be empty: say why, for the audit trail.")
        if len(reason) > REASON_MAX:
            raise CommandError(f"--reason is too long: at most {REASON_MAX} characters.")
        with service_errors():
            member = member_get(username=username, team_slug=team)
            if reset:
                counter = quota_reset(member=member, reason=reason)
            else:
                counter = quota_top_up(member=member, requests=top_up_requests or 0, tokens=top_up_tokens or 0,
                                       reason=reason)
        self.stdout.write(
            f"{member} {counter.period_start:%Y-%m}: "
            f"requests {counter.requests_used} used of {limit_text(counter.request_limit)}, "
            f"tokens {counter.tokens_used} used of {limit_text(counter.token_limit)}."
        )
