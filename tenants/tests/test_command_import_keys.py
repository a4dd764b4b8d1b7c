"""import_keys: a team moving to QwenHub keeps its members' keys and request quotas, all or nothing."""
import json
import logging

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError
from django.db import connection

from tenants.keys import api_key_hash
from tenants.models import ApiKey, AuditEvent, Member, QuotaCounter
from tenants.periods import period_start_for
from tenants.tests.factories import ApiKeyFactory, TeamFactory
from tenants.tests.utils import run_command, tables_containing

pytestmark = pytest.mark.django_db
User = get_user_model()

GOOD = {
    "alice": {"key": "sk-abc123", "quota": 1000, "used": 250},
    "bob": {"key": "sk-bob-0123456789abcdef", "quota": None, "used": 7},
    "carol": {"key": "sk-carol-xyz", "quota": 50, "used": 0},
}


@pytest.fixture
def team():
    return TeamFactory(slug="nlp", timezone="Asia/Shanghai")


def write(tmp_path, data) -> str:
    path = tmp_path / "keys.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def counts() -> tuple[int, ...]:
    return (User.objects.count(), Member.objects.count(), ApiKey.objects.count(), AuditEvent.objects.count(),
            QuotaCounter.objects.count())


def test_import_keeps_old_keys_working_and_carries_quota_over(team, tmp_path):
    out, _ = run_command("import_keys", "nlp", write(tmp_path, GOOD))
    # the old key is found by its hash, for the right member
    key = ApiKey.objects.select_related("member__user").get(key_hash=api_key_hash("sk-abc123"))
    assert key.member.user.username == "alice" and key.member.team == team and key.revoked_at is None
    assert key.member.request_quota == 1000
    # "used" is charged to this month's counter, whose limit is the quota
    counter = QuotaCounter.objects.get(member=key.member, period_start=period_start_for("Asia/Shanghai"))
    assert (counter.request_limit, counter.requests_used) == (1000, 250)
    bob = Member.objects.get(user__username="bob")
    assert bob.request_quota is None
    assert QuotaCounter.objects.get(member=bob).requests_used == 7
    # nothing used, no counter needed yet
    assert not QuotaCounter.objects.filter(member__user__username="carol").exists()
    assert ApiKey.objects.count() == 3 and "Imported 3" in out
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.KEY_IMPORTED).count() == 3


def test_import_never_stores_prints_or_logs_the_keys(team, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="django.db.backends")
    connection.force_debug_cursor = True
    try:
        out, err = run_command("import_keys", "nlp", write(tmp_path, GOOD))
    finally:
        connection.force_debug_cursor = False
    assert any("INSERT INTO" in r.getMessage() for r in caplog.records)
    for entry in GOOD.values():
        raw = entry["key"]
        assert tables_containing(raw) == [], raw
        assert raw not in out and raw not in err and raw not in caplog.text
        assert tables_containing(api_key_hash(raw)) == ["tenants_apikey"]
    # the displayed prefix is at most a third of the key
    for key in ApiKey.objects.all():
        assert len(key.prefix) * 3 <= min(len(e["key"]) for e in GOOD.values() if e["key"].startswith(key.prefix))


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[]", "must hold a JSON object"),
        ("{}", "must hold a JSON object"),
        ('"alice"', "must hold a JSON object"),
        ({"alice": "sk-abc123"}, "Entry 'alice': expected an object"),
        ({"alice": {"quota": 10}}, "Entry 'alice': 'key' must be"),
        ({"alice": {"key": "short"}}, "Entry 'alice': 'key' must be"),
        ({"alice": {"key": 12345678}}, "Entry 'alice': 'key' must be"),
        ({"alice": {"key": "sk-abc123", "quota": -1}}, "'quota' must be a non-negative"),
        ({"alice": {"key": "sk-abc123", "quota": "1000"}}, "'quota' must be a non-negative"),
        ({"alice": {"key": "sk-abc123", "quota": 1.5}}, "'quota' must be a non-negative"),
        ({"alice": {"key": "sk-abc123", "used": True}}, "'used' must be a non-negative"),
        ({"alice": {"key": "sk-abc123"}, "bob": {"key": "sk-abc123"}}, "Entry 'bob': that key is already registered"),
        ('{"alice": {"key": "sk-abc123"}, "alice": {"key": "sk-other-123"}}', "appears more than once"),
    ],
)
def test_malformed_files_are_refused_and_nothing_is_written(team, tmp_path, content, message):
    before = counts()
    with pytest.raises(CommandError, match=message):
        run_command("import_keys", "nlp", write(tmp_path, content))
    assert counts() == before


def test_a_bad_entry_late_in_the_file_aborts_the_whole_import(team, tmp_path):
    # valid entries first, then one that only fails when written (the user name is not a valid user name)
    data = {**GOOD, "dave": {"key": "sk-dave-123", "quota": 5, "used": 1}, "bad name!": {"key": "sk-zzz-999"}}
    before = counts()
    with pytest.raises(CommandError, match="username"):
        run_command("import_keys", "nlp", write(tmp_path, data))
    assert counts() == before
    assert not ApiKey.objects.filter(key_hash=api_key_hash("sk-abc123")).exists()


def test_an_entry_clashing_with_an_existing_user_aborts_everything(team, tmp_path):
    run_command("add_member", "nlp", "carol")
    before = counts()
    with pytest.raises(CommandError, match="User 'carol' already exists"):
        run_command("import_keys", "nlp", write(tmp_path, GOOD))  # carol is the last entry
    assert counts() == before


def test_a_key_already_registered_is_refused(team, tmp_path):
    existing = ApiKeyFactory(raw="sk-abc123", prefix="sk-")
    before = counts()
    with pytest.raises(CommandError, match="Entry 'alice': that key is already registered"):
        run_command("import_keys", "nlp", write(tmp_path, GOOD))
    assert counts() == before and ApiKey.objects.get().pk == existing.pk


def test_used_above_quota_is_capped_at_the_quota(team, tmp_path):
    run_command("import_keys", "nlp", write(tmp_path, {"erin": {"key": "sk-erin-1234", "quota": 10, "used": 15}}))
    counter = QuotaCounter.objects.get(member__user__username="erin")
    assert (counter.request_limit, counter.requests_used) == (10, 10)


def test_unknown_team_and_missing_file(team, tmp_path):
    with pytest.raises(CommandError, match="No team with slug 'nope'"):
        run_command("import_keys", "nope", write(tmp_path, GOOD))
    with pytest.raises(CommandError, match="No such file"):
        run_command("import_keys", "nlp", str(tmp_path / "missing.json"))
    (tmp_path / "latin1.json").write_bytes(b'{"\xe9": 1}')
    with pytest.raises(CommandError, match="not UTF-8"):
        run_command("import_keys", "nlp", str(tmp_path / "latin1.json"))
    assert not Member.objects.exists()


def test_import_reads_stdin_with_a_dash(team, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"frank": {"key": "sk-frank-42", "quota": 3}})))
    run_command("import_keys", "nlp", "-")
    assert ApiKey.objects.get(key_hash=api_key_hash("sk-frank-42")).member.request_quota == 3
