"""Seed a demo team, its members, the simulator upstream and a Django superuser."""
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from proxy.models import ModelRoute, Upstream
from proxy.services import upstream_add
from tenants.management.base import limit_text, service_errors
from tenants.models import ApiKey, Member, Team
from tenants.services import api_key_issue, api_key_revoke, member_add, team_create

DEMO_TEAM = "demo"
DEMO_PASSWORD = "qwenhub-demo"
DEMO_NEEDS_PASSWORD = "DEBUG is off: give the demo accounts a password of your own with --password."
DEMO_KEY_LABEL = "demo"
DEMO_KEY_OWNER = "alice"
SUPERUSER = "admin"
# (username, role, requests per month, tokens per month); None = unlimited.
DEMO_MEMBERS = [
    ("demo-admin", Member.Role.ADMIN, None, None),
    ("alice", Member.Role.MEMBER, 1000, 1_000_000),
    ("bob", Member.Role.MEMBER, 200, 200_000),
]
UPSTREAM = "simulator"
SERVED_NAME = "Qwen2.5-7B-Instruct"  # what vLLM (and the simulator) call the model
PUBLIC_NAME = "qwen2.5-7b-instruct"  # what /v1/models lists and members type
ALIASES = ["qwen", "Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"]


class Command(BaseCommand):
    help = (
        f"Seed a demo: team '{DEMO_TEAM}' (3000 CNY/month, Asia/Shanghai), members demo-admin, alice and bob, "
        f"upstream '{UPSTREAM}' at QWENHUB_SIMULATOR_URL serving {SERVED_NAME} as {PUBLIC_NAME}, and a "
        f"Django superuser '{SUPERUSER}'; print the logins and a fresh API key for {DEMO_KEY_OWNER}. "
        f"Safe to run again: existing rows (and their passwords) are kept, and each run issues a new "
        f"'{DEMO_KEY_LABEL}' key for {DEMO_KEY_OWNER} and revokes the earlier ones. Each step is its own "
        f"transaction, so an interrupted run is completed by running it again."
    )

    def add_arguments(self, parser):
        parser.add_argument("--password",
                            help=f"Password for the accounts this run creates (default {DEMO_PASSWORD}; "
                                 f"required with DEBUG off, where a published password must not be used).")

    def handle(self, *args, password, **options):
        if not password:
            if not settings.DEBUG:
                # The demo also creates a superuser: never with a password printed in the docs.
                raise CommandError(DEMO_NEEDS_PASSWORD)
            password = DEMO_PASSWORD
        with service_errors():
            created, team = [], Team.objects.filter(slug=DEMO_TEAM).first()
            if team is None:
                team = team_create(slug=DEMO_TEAM, name="Demo team", monthly_cost="3000", currency="CNY",
                                   timezone_name="Asia/Shanghai")
                created.append(f"team {DEMO_TEAM}")
            new_users = set()
            for username, role, requests, tokens in DEMO_MEMBERS:
                if not Member.objects.filter(team=team, user__username=username).exists():
                    member_add(team=team, username=username, email=f"{username}@example.com", role=role,
                               request_quota=requests, token_quota=tokens, password=password, reason="demo")
                    new_users.add(username)
                    created.append(f"member {username}")
            if not Upstream.objects.filter(name=UPSTREAM).exists():
                upstream_add(name=UPSTREAM, base_url=settings.QWENHUB_SIMULATOR_URL, served_name=SERVED_NAME,
                             public_name=PUBLIC_NAME, aliases=ALIASES)
                created.append(f"upstream {UPSTREAM}")
            User = get_user_model()
            if not User.objects.filter(username=SUPERUSER).exists():
                User.objects.create_superuser(SUPERUSER, f"{SUPERUSER}@example.com", password)
                new_users.add(SUPERUSER)
                created.append(f"superuser {SUPERUSER}")
            raw = self._rotate_key(team)
        team.refresh_from_db()
        self._report(team, created, new_users, password, raw)

    def _rotate_key(self, team: Team) -> str:
        """Issue a new demo key for the owner, then revoke the earlier ones (the raw keys are gone)."""
        member = Member.objects.select_related("team", "user").get(team=team, user__username=DEMO_KEY_OWNER)
        key, raw = api_key_issue(member=member, label=DEMO_KEY_LABEL)
        earlier = ApiKey.objects.select_related("member__team").filter(
            member=member, label=DEMO_KEY_LABEL, revoked_at__isnull=True).exclude(pk=key.pk)
        for old in earlier:
            api_key_revoke(key=old, reason="replaced by a new demo key")
        return raw

    def _report(self, team, created, new_users, password, raw) -> None:
        out = self.stdout.write
        out("QwenHub demo: " + (f"created {', '.join(created)}." if created else "nothing new to create."))
        out("")
        out(f"Team     {team.slug} ({team.name}): {team.monthly_cost} {team.currency}/month, {team.timezone}")
        for route in ModelRoute.objects.select_related("model", "upstream").filter(upstream__name=UPSTREAM):
            aliases = sorted(route.model.aliases.values_list("alias", flat=True))
            out(f"Model    {route.model.name}" + (f" (also: {', '.join(aliases)})" if aliases else ""))
            out(f"         served as {route.served_name} by upstream {route.upstream.name} "
                f"at {route.upstream.base_url}")
        out("")
        out("Logins")

        def login(username: str, what: str) -> None:
            secret = f"password {password}" if username in new_users else "existing account, password unchanged"
            out(f"  {username:<11} {what:<50} {secret}")

        login(SUPERUSER, "Django admin superuser (/admin/)")
        members = {m.user.username: m for m in Member.objects.select_related("user").filter(team=team)}
        for username, *_ in DEMO_MEMBERS:
            m = members[username]
            login(username, f"{m.role}, {limit_text(m.request_quota)} requests, "
                            f"{limit_text(m.token_quota)} tokens/month")
        out("")
        out(f"The key below is shown once; earlier '{DEMO_KEY_LABEL}' keys of {DEMO_KEY_OWNER} are now revoked.")
        out(f"API key for {DEMO_KEY_OWNER}: {raw}")
