"""quota: top up or reset a member's quota for this month from the command line."""
import pytest
from django.core.management import CommandError

from tenants.models import AuditEvent, QuotaCounter
from tenants.tests.factories import MemberFactory, QuotaCounterFactory
from tenants.tests.utils import run_command

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice():
    return MemberFactory(user__username="alice", team__slug="nlp", request_quota=100, token_quota=1000)


def test_top_up_requests_prints_the_new_limits(alice):
    QuotaCounterFactory(member=alice, requests_used=99)
    out, _ = run_command("quota", "alice", "--top-up-requests", "50", "--reason", "deadline")
    counter = QuotaCounter.objects.get(member=alice)
    assert counter.request_limit == 150 and counter.token_limit == 1000
    assert "99 used of 150" in out and "of 1000" in out
    assert AuditEvent.objects.get(kind=AuditEvent.Kind.QUOTA_TOPPED_UP).reason == "deadline"


def test_top_up_tokens(alice):
    run_command("quota", "alice", "--team", "nlp", "--top-up-tokens", "500", "--reason", "r")
    assert QuotaCounter.objects.get(member=alice).token_limit == 1500


def test_reset(alice):
    QuotaCounterFactory(member=alice, requests_used=100, tokens_used=1000)
    out, _ = run_command("quota", "alice", "--reset", "--reason", "new grant")
    counter = QuotaCounter.objects.get(member=alice)
    assert (counter.request_limit, counter.token_limit) == (200, 2000)
    assert "100 used of 200" in out


def test_top_up_on_unlimited_fails_clearly(alice):
    MemberFactory(user__username="bob", request_quota=None)
    with pytest.raises(CommandError, match="unlimited"):
        run_command("quota", "bob", "--top-up-requests", "5", "--reason", "r")
    assert not AuditEvent.objects.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["alice", "--reason", "r"], "one of the arguments"),
        (["alice", "--reset", "--top-up-requests", "5", "--reason", "r"], "not allowed with"),
        (["alice", "--top-up-requests", "5"], "--reason"),
        (["alice", "--top-up-requests", "5", "--reason", "  "], "must not be empty"),
        (["alice", "--top-up-requests", "5", "--reason", "x" * 501], "too long"),
        (["alice", "--top-up-requests", "0", "--reason", "r"], "at least 1"),
        (["alice", "--top-up-tokens", "-5", "--reason", "r"], "negative"),
        (["nobody", "--reset", "--reason", "r"], "No member with username 'nobody'"),
        (["alice", "--team", "other", "--reset", "--reason", "r"], "No member"),
    ],
)
def test_bad_input_writes_nothing(alice, args, message):
    with pytest.raises(CommandError, match=message):
        run_command("quota", *args)
    assert not QuotaCounter.objects.exists() and not AuditEvent.objects.exists()
