from django.core.management.base import BaseCommand

from tenants.management.base import limit_text, non_negative_int, service_errors
from tenants.models import Member
from tenants.services import member_add, team_get


class Command(BaseCommand):
    help = "Create a user and add them to a team. A quota left out is unlimited."

    def add_arguments(self, parser):
        parser.add_argument("team", help="Slug of the team.")
        parser.add_argument("username", help="New user name (must not exist yet).")
        parser.add_argument("--email", default="", help="E-mail address (monthly statements go there).")
        parser.add_argument("--role", choices=Member.Role.values, default=Member.Role.MEMBER,
                            help="member (default) or admin (sees the whole team's usage).")
        parser.add_argument("--request-quota", type=non_negative_int, default=None,
                            help="Requests per month (default: unlimited).")
        parser.add_argument("--token-quota", type=non_negative_int, default=None,
                            help="Tokens per month (default: unlimited).")
        parser.add_argument("--password",
                            help="Password for the dashboards (default: none, the user cannot log in).")

    def handle(self, *args, team, username, email, role, request_quota, token_quota, password, **options):
        with service_errors():
            member = member_add(team=team_get(slug=team), username=username, email=email, role=role,
                                request_quota=request_quota, token_quota=token_quota, password=password)
        self.stdout.write(
            f"Added {username} to team {member.team.slug} as {member.role}: "
            f"{limit_text(member.request_quota)} requests and {limit_text(member.token_quota)} tokens per month"
            + ("." if password else "; no password set, so no dashboard login.")
        )
