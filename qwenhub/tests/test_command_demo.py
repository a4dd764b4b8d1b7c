"""demo: seeds a usable demo and can be run again."""
import re

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError

from proxy.models import ModelAlias, ModelRoute, PublicModel, Upstream
from tenants.keys import api_key_hash, api_key_is_plausible
from tenants.models import ApiKey, Member, Team
from tenants.tests.factories import MemberFactory
from tenants.tests.utils import run_command, tables_containing

User = get_user_model()
KEY_LINE = re.compile(r"^API key for alice: (\S+)$", re.MULTILINE)


def printed_key(out: str) -> str:
    keys = KEY_LINE.findall(out)
    assert len(keys) == 1, out
    return keys[0]


@pytest.fixture(autouse=True)
def _debug(settings):
    settings.DEBUG = True  # as in embedded mode (`make run`); the production case is tested on its own


def counts() -> tuple[int, ...]:
    return (Team.objects.count(), Member.objects.count(), User.objects.count(), Upstream.objects.count(),
            PublicModel.objects.count(), ModelAlias.objects.count(), ModelRoute.objects.count())


# transaction=True: the demo runs several durable services in a row, which a test transaction would hide.
@pytest.mark.django_db(transaction=True)
def test_demo_seeds_team_members_upstream_superuser_and_a_working_key(settings):
    settings.QWENHUB_SIMULATOR_URL = "http://127.0.0.1:8001/v1"
    out, _ = run_command("demo")
    team = Team.objects.get(slug="demo")
    assert (str(team.monthly_cost), team.currency, team.timezone) == ("3000.00", "CNY", "Asia/Shanghai")
    roles = dict(Member.objects.filter(team=team).values_list("user__username", "role"))
    assert roles == {"demo-admin": "admin", "alice": "member", "bob": "member"}
    alice = Member.objects.get(team=team, user__username="alice")
    assert alice.request_quota and alice.token_quota and alice.user.check_password("qwenhub-demo")
    assert User.objects.get(username="admin").is_superuser
    route = ModelRoute.objects.select_related("model", "upstream").get(upstream__name="simulator")
    assert route.upstream.base_url == "http://127.0.0.1:8001/v1"
    assert (route.served_name, route.model.name) == ("Qwen2.5-7B-Instruct", "qwen2.5-7b-instruct")
    assert {"qwen", "Qwen2.5-7B-Instruct"} <= set(route.model.aliases.values_list("alias", flat=True))
    raw = printed_key(out)
    assert api_key_is_plausible(raw)
    key = ApiKey.objects.get(key_hash=api_key_hash(raw))
    assert key.member == alice and key.label == "demo" and key.revoked_at is None
    assert tables_containing(raw) == []
    assert "qwen2.5-7b-instruct" in out and "qwenhub-demo" in out


@pytest.mark.django_db(transaction=True)
def test_demo_twice_creates_nothing_new_and_prints_a_fresh_working_key():
    first = printed_key(run_command("demo")[0])
    before = counts()
    out, _ = run_command("demo", "--password", "another-password")
    second = printed_key(out)
    assert counts() == before
    assert second != first
    new = ApiKey.objects.get(key_hash=api_key_hash(second))
    old = ApiKey.objects.get(key_hash=api_key_hash(first))
    assert new.revoked_at is None and old.revoked_at is not None  # the earlier demo key is replaced
    assert ApiKey.objects.filter(label="demo", revoked_at__isnull=True).count() == 1
    # existing accounts keep their password, and the output says so instead of printing a wrong one
    assert User.objects.get(username="alice").check_password("qwenhub-demo")
    assert "another-password" not in out and "password unchanged" in out
    assert "nothing new" in out


@pytest.mark.django_db
def test_demo_keeps_keys_with_other_labels():
    run_command("demo")
    out, _ = run_command("create_key", "alice", "--label", "laptop")
    run_command("demo")
    assert ApiKey.objects.get(key_hash=api_key_hash(out.strip())).revoked_at is None


@pytest.mark.django_db
def test_demo_password_option_sets_the_new_accounts_password():
    run_command("demo", "--password", "my-own-demo-pw")
    assert User.objects.get(username="bob").check_password("my-own-demo-pw")
    assert User.objects.get(username="admin").check_password("my-own-demo-pw")


@pytest.mark.django_db
def test_demo_stops_clearly_when_a_demo_username_belongs_to_someone_else():
    MemberFactory(user__username="alice", team__slug="elsewhere")
    with pytest.raises(CommandError, match="User 'alice' already exists"):
        run_command("demo")


@pytest.mark.django_db
def test_with_debug_off_the_published_default_password_is_refused(settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="give the demo accounts a password"):
        run_command("demo")
    assert not Team.objects.exists() and not User.objects.exists()
    run_command("demo", "--password", "chosen-by-the-operator")
    assert User.objects.get(username="admin").check_password("chosen-by-the-operator")
