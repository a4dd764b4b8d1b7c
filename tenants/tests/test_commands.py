"""create_team, add_member, create_key and revoke_key: the contract scripts rely on."""
import logging
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError
from django.db import connection

from tenants.keys import api_key_hash, api_key_is_plausible
from tenants.models import ApiKey, AuditEvent, Member, Team
from tenants.tests.factories import ApiKeyFactory, MemberFactory, TeamFactory
from tenants.tests.utils import run_command, tables_containing

pytestmark = pytest.mark.django_db
User = get_user_model()


# --- create_team ---------------------------------------------------------------

def test_create_team_stores_what_was_asked_and_audits():
    out, _ = run_command("create_team", "nlp", "--name", "NLP lab", "--monthly-cost", "3000",
                         "--currency", "cny", "--timezone", "Asia/Shanghai")
    team = Team.objects.get(slug="nlp")
    assert (team.name, team.monthly_cost, team.currency, team.timezone) == (
        "NLP lab", Decimal("3000.00"), "CNY", "Asia/Shanghai")
    assert "nlp" in out and "3000.00 CNY" in out
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.TEAM_CREATED, subject_id=team.pk).count() == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--currency", "US"], "three-letter ISO 4217"),
        (["--currency", "EURO"], "three-letter ISO 4217"),
        (["--timezone", "Mars/Olympus"], "Unknown time zone"),
        (["--monthly-cost", "-5"], "non-negative amount"),
        (["--monthly-cost", "abc"], "non-negative amount"),
        (["--monthly-cost", "10.001"], "non-negative amount"),
        (["--monthly-cost", "NaN"], "non-negative amount"),
    ],
)
def test_create_team_rejects_bad_input_and_writes_nothing(args, message):
    with pytest.raises(CommandError, match=message):
        run_command("create_team", "nlp", *args)
    assert not Team.objects.exists() and not AuditEvent.objects.exists()


def test_create_team_rejects_a_bad_slug():
    with pytest.raises(CommandError, match="slug"):
        run_command("create_team", "not a slug")
    assert not Team.objects.exists()


def test_create_team_twice_is_refused():
    run_command("create_team", "nlp")
    with pytest.raises(CommandError, match="already exists"):
        run_command("create_team", "nlp", "--name", "Other")
    assert Team.objects.get(slug="nlp").name == "nlp"


# --- add_member ----------------------------------------------------------------

def test_add_member_with_quotas_and_password():
    team = TeamFactory(slug="nlp")
    out, _ = run_command("add_member", "nlp", "alice", "--email", "alice@example.com", "--role", "admin",
                         "--request-quota", "1000", "--token-quota", "0", "--password", "s3cret-pass")
    member = Member.objects.select_related("user").get(team=team, user__username="alice")
    assert (member.role, member.request_quota, member.token_quota) == ("admin", 1000, 0)
    assert member.user.email == "alice@example.com" and member.user.check_password("s3cret-pass")
    assert "alice" in out and "s3cret-pass" not in out
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.MEMBER_ADDED, member=member).exists()


def test_add_member_quotas_left_out_are_unlimited_and_no_password_means_no_login():
    TeamFactory(slug="nlp")
    run_command("add_member", "nlp", "bob")
    member = Member.objects.select_related("user").get(user__username="bob")
    assert member.request_quota is None and member.token_quota is None and member.role == "member"
    assert not member.user.has_usable_password()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--request-quota", "-1"], "negative"),
        (["--token-quota", "-5"], "negative"),
        (["--request-quota", "lots"], "not a whole number"),
        (["--role", "owner"], "invalid choice"),
        (["--email", "not-an-email"], "email"),
    ],
)
def test_add_member_rejects_bad_input_and_writes_nothing(args, message):
    TeamFactory(slug="nlp")
    with pytest.raises(CommandError, match=message):
        run_command("add_member", "nlp", "alice", *args)
    assert not User.objects.filter(username="alice").exists() and not Member.objects.exists()


def test_add_member_to_an_unknown_team():
    with pytest.raises(CommandError, match="No team with slug 'nope'"):
        run_command("add_member", "nope", "alice")
    assert not User.objects.filter(username="alice").exists()


def test_add_member_with_a_taken_username():
    MemberFactory(user__username="alice")
    TeamFactory(slug="nlp")
    with pytest.raises(CommandError, match="User 'alice' already exists"):
        run_command("add_member", "nlp", "alice")
    assert Member.objects.filter(user__username="alice").count() == 1


# --- create_key ----------------------------------------------------------------

def test_create_key_prints_only_the_key_which_works_by_hash():
    member = MemberFactory(user__username="alice", team__slug="nlp")
    out, err = run_command("create_key", "alice", "--label", "laptop", "--expires-days", "30")
    raw = out.removesuffix("\n")
    assert out == raw + "\n" and "\n" not in raw
    assert api_key_is_plausible(raw)
    key = ApiKey.objects.get(key_hash=api_key_hash(raw))
    assert key.member == member and key.label == "laptop" and raw.startswith(key.prefix)
    assert key.expires_at is not None and raw not in err


def test_create_key_never_stores_or_logs_the_key(caplog):
    MemberFactory(user__username="alice")
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="django.db.backends")
    connection.force_debug_cursor = True  # log every SQL statement with its parameters
    try:
        out, err = run_command("create_key", "alice")
    finally:
        connection.force_debug_cursor = False
    raw = out.strip()
    assert any("INSERT INTO" in r.getMessage() for r in caplog.records)  # the logs were really captured
    assert raw not in caplog.text
    assert not any(raw in str(r.args) for r in caplog.records)
    assert tables_containing(raw) == []
    assert tables_containing(api_key_hash(raw)) == ["tenants_apikey"]  # the search finds what is there


def test_create_key_for_a_user_in_two_teams_needs_team():
    member = MemberFactory(user__username="alice", team__slug="a")
    MemberFactory(user=member.user, team__slug="b")
    with pytest.raises(CommandError, match="several teams"):
        run_command("create_key", "alice")
    out, _ = run_command("create_key", "alice", "--team", "b")
    assert ApiKey.objects.get(key_hash=api_key_hash(out.strip())).member.team.slug == "b"


@pytest.mark.parametrize(
    "args, message",
    [
        (["nobody"], "No member with username 'nobody'"),
        (["alice", "--team", "other"], "No member with username 'alice'"),
        (["alice", "--expires-days", "0"], "at least 1"),
        (["alice", "--expires-days", "-3"], "negative"),
    ],
)
def test_create_key_bad_input(args, message):
    MemberFactory(user__username="alice")
    with pytest.raises(CommandError, match=message):
        run_command("create_key", *args)
    assert not ApiKey.objects.exists()


# --- revoke_key ----------------------------------------------------------------

def test_revoke_key_by_prefix():
    key = ApiKeyFactory(label="laptop")
    out, _ = run_command("revoke_key", key.prefix, "--reason", "laptop stolen")
    key.refresh_from_db()
    assert key.revoked_at is not None and key.prefix in out
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.KEY_REVOKED, subject_id=key.pk)
    assert event.reason == "laptop stolen"


def test_revoke_key_unknown_prefix():
    ApiKeyFactory()
    with pytest.raises(CommandError, match="No API key with prefix 'qh_nothing'"):
        run_command("revoke_key", "qh_nothing")
    assert not ApiKey.objects.filter(revoked_at__isnull=False).exists()


def test_revoke_key_ambiguous_prefix_revokes_nothing():
    ApiKeyFactory.create_batch(2)
    with pytest.raises(CommandError, match="matches 2 keys"):
        run_command("revoke_key", "qh_")
    assert not ApiKey.objects.filter(revoked_at__isnull=False).exists()


def test_revoke_key_twice():
    key = ApiKeyFactory()
    run_command("revoke_key", key.prefix)
    with pytest.raises(CommandError, match="already revoked"):
        run_command("revoke_key", key.prefix)
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.KEY_REVOKED).count() == 1


def test_every_command_has_help():
    for name in ["create_team", "add_member", "create_key", "revoke_key", "import_keys", "quota", "demo",
                 "add_upstream"]:
        with pytest.raises(SystemExit) as exit_info:
            run_command(name, "--help")
        assert exit_info.value.code == 0
