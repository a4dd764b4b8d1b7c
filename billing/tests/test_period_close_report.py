"""period_close reports the reservations it released to the team's admins, once, by e-mail (locmem backend)."""
import zoneinfo
from datetime import date, datetime

import pytest
from django.core import mail
from django.core.mail.backends.base import BaseEmailBackend
from django.urls import reverse

from billing.services import period_close
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.models import Member, TeamQuotaCounter
from tenants.tests.factories import QuotaCounterFactory, TeamFactory, UserFactory

SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
NOV = date(2026, 11, 1)
AFTER_NOV = datetime(2026, 12, 1, 0, 10, tzinfo=SHANGHAI)
PUBLIC_URL = "https://hub.example.org"


class RefusingBackend(BaseEmailBackend):
    def send_messages(self, messages):
        raise ConnectionRefusedError("the mail server is down")


@pytest.fixture
def lab(settings):
    """lab: alice and dora (admins), a suspended admin, bob (member, 2 requests stuck), a stuck team cap."""
    settings.QWENHUB_PUBLIC_URL = PUBLIC_URL
    team = TeamFactory(slug="lab", name="Lab", monthly_cost="100.00", timezone="Asia/Shanghai", token_cap=10_000_000)
    MemberJoinedFactory(team=team, user=UserFactory(username="alice"), role=Member.Role.ADMIN)
    MemberJoinedFactory(team=team, user=UserFactory(username="dora"), role=Member.Role.ADMIN)
    MemberJoinedFactory(team=team, user=UserFactory(username="gone"), role=Member.Role.ADMIN, is_active=False)
    bob = MemberJoinedFactory(team=team, user=UserFactory(username="bob"))
    usage(bob, NOV, prompt=100, completion=100)
    QuotaCounterFactory(member=bob, period_start=NOV, requests_reserved=2, tokens_reserved=900)
    TeamQuotaCounter.objects.create(team=team, period_start=NOV, token_limit=10_000_000, tokens_reserved=700)
    return team


@pytest.mark.django_db
def test_the_admins_get_one_report_of_what_the_close_released(lab):
    period = period_close(team=lab, start=NOV, now=AFTER_NOV, wait_seconds=0)
    assert len(period.released_reservations) == 2
    [message] = mail.outbox
    assert sorted(message.to) == ["alice@example.com", "dora@example.com"]  # active admins only, not bob
    assert message.subject == "QwenHub: Lab's November 2026 was closed with 2 stuck reservations released"
    assert "had not finished 0 seconds after its end" in message.body
    assert "- bob: 2 requests, 900 tokens\n" in message.body
    assert "- The team's token cap: 700 tokens\n" in message.body
    assert PUBLIC_URL + reverse("admin:billing_billingperiod_change", args=[period.pk]) in message.body
    assert "{" not in message.subject + message.body and "&#" not in message.body
    # a rerun (the hourly task again, close_period by hand) finds the month closed: no second report
    period_close(team=lab, start=NOV, now=AFTER_NOV, wait_seconds=0)
    assert len(mail.outbox) == 1


@pytest.mark.django_db
def test_a_close_without_stuck_reservations_sends_nothing(lab):
    from tenants.models import QuotaCounter
    QuotaCounter.objects.update(requests_reserved=0, tokens_reserved=0)
    TeamQuotaCounter.objects.update(tokens_reserved=0)
    period = period_close(team=lab, start=NOV, now=AFTER_NOV, wait_seconds=0)
    assert period.released_reservations == [] and mail.outbox == []


@pytest.mark.django_db
def test_a_mail_server_refusing_the_report_does_not_undo_the_close(lab, settings, caplog):
    settings.EMAIL_BACKEND = "billing.tests.test_period_close_report.RefusingBackend"
    period = period_close(team=lab, start=NOV, now=AFTER_NOV, wait_seconds=0)
    assert period.status == "closed" and len(period.released_reservations) == 2
    assert "the report of released reservations was not sent" in caplog.text


@pytest.mark.django_db
def test_no_admin_address_is_logged_and_the_close_goes_on(lab, caplog):
    Member.objects.filter(team=lab, role=Member.Role.ADMIN).update(is_active=False)
    period = period_close(team=lab, start=NOV, now=AFTER_NOV, wait_seconds=0)
    assert period.status == "closed" and mail.outbox == []
    assert "2 stuck reservation(s) released, but no active admin has an e-mail address" in caplog.text


@pytest.mark.django_db
def test_one_stuck_request_reads_in_the_singular(lab):
    from tenants.models import QuotaCounter
    QuotaCounter.objects.update(requests_reserved=1, tokens_reserved=40)
    TeamQuotaCounter.objects.update(tokens_reserved=0)
    period_close(team=lab, start=NOV, now=AFTER_NOV, wait_seconds=0)
    [message] = mail.outbox
    assert message.subject.endswith("with 1 stuck reservation released")
    assert "- bob: 1 request, 40 tokens\n" in message.body

