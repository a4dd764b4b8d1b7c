"""Soft-quota warnings: one e-mail per member, period, quota and level, however often the task runs."""
import smtplib
import zoneinfo
from datetime import date, datetime

import pytest
import time_machine

from billing.models import QuotaWarning
from billing.services import quota_warnings_send
from billing.tasks import quota_warnings_task
from qwenhub.celery import app as celery_app
from tenants.models import QuotaCounter
from tenants.tests.factories import MemberFactory, QuotaCounterFactory, TeamFactory, UserFactory

UTC = zoneinfo.ZoneInfo("UTC")
NOV, DEC = date(2026, 11, 1), date(2026, 12, 1)
MID_NOV = datetime(2026, 11, 15, 12, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _mid_november():
    with time_machine.travel(MID_NOV, tick=False):
        yield


def _counter(tz="UTC", *, start=NOV, requests=0, tokens=0, request_limit=100, token_limit=10_000,
             reserved_requests=0, reserved_tokens=0, **member):
    m = MemberFactory(team=TeamFactory(timezone=tz), request_quota=request_limit, token_quota=token_limit, **member)
    return QuotaCounterFactory(member=m, period_start=start, requests_used=requests, tokens_used=tokens,
                               requests_reserved=reserved_requests, tokens_reserved=reserved_tokens,
                               request_limit=request_limit, token_limit=token_limit)


def _use(counter, **fields):
    QuotaCounter.objects.filter(pk=counter.pk).update(**fields)


@pytest.mark.django_db
def test_one_email_per_level_however_often_it_runs(mailoutbox):
    counter = _counter(requests=79)
    assert quota_warnings_send() == [] and mailoutbox == []  # 79 %: nothing
    _use(counter, requests_used=70, requests_reserved=10)  # 80 % with the requests in flight
    for _ in range(3):
        quota_warnings_send()
    assert len(mailoutbox) == 1
    mail = mailoutbox[0]
    assert mail.to == [counter.member.user.email]
    assert "80%" in mail.subject and "request quota" in mail.subject and "2026-11" in mail.subject
    assert "80 of 100" in mail.body and "left: 20" in mail.body
    _use(counter, requests_used=100, requests_reserved=0)
    for _ in range(3):
        quota_warnings_send()
    assert len(mailoutbox) == 2 and "all of your request quota" in mailoutbox[1].subject
    assert set(QuotaWarning.objects.values_list("kind", "level")) == {("requests", 80), ("requests", 100)}
    assert QuotaWarning.objects.filter(sent_at__isnull=True).count() == 0


@pytest.mark.django_db
def test_the_task_sends_through_the_same_service(mailoutbox):
    _counter(tokens=9_000)
    before = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    try:
        assert quota_warnings_task.delay().get() == 1
        assert quota_warnings_task.delay().get() == 0
    finally:
        celery_app.conf.task_always_eager = before
    assert len(mailoutbox) == 1 and "token quota" in mailoutbox[0].subject


@pytest.mark.django_db
def test_a_jump_past_both_levels_sends_only_the_higher_one(mailoutbox):
    counter = _counter(tokens=9_999, reserved_tokens=1)
    quota_warnings_send()
    _use(counter, tokens_reserved=0, tokens_used=8_500)  # back under 100 % (the reservation settled lower)
    quota_warnings_send()
    assert [m.subject for m in mailoutbox] == ["QwenHub: you have used all of your token quota for 2026-11"]


@pytest.mark.django_db
def test_requests_and_tokens_are_warned_separately(mailoutbox):
    _counter(requests=80, tokens=8_000)
    quota_warnings_send()
    assert sorted("token" in m.subject for m in mailoutbox) == [False, True]


@pytest.mark.django_db
def test_no_warning_for_unlimited_or_zero_quotas_suspended_members_or_no_address(mailoutbox):
    _counter(requests=10**9, tokens=10**12, request_limit=None, token_limit=None)
    _counter(request_limit=0, token_limit=0)
    _counter(requests=100, is_active=False)
    _counter(requests=100, user=UserFactory(email=""))
    assert quota_warnings_send() == []
    assert mailoutbox == [] and not QuotaWarning.objects.exists()


@pytest.mark.django_db
def test_only_the_open_period_counts_in_each_teams_time_zone(mailoutbox):
    _counter(start=date(2026, 10, 1), requests=100)  # October is over
    with time_machine.travel(datetime(2026, 11, 30, 17, tzinfo=UTC), tick=False):  # December in Shanghai
        _counter("Asia/Shanghai", start=NOV, requests=100)
        _counter("Asia/Shanghai", start=DEC, requests=90)
        _counter("UTC", start=NOV, tokens=10_000)
        quota_warnings_send()
    assert sorted((w.period_start, w.kind, w.level) for w in QuotaWarning.objects.all()) == [
        (NOV, "tokens", 100), (DEC, "requests", 80)]
    assert len(mailoutbox) == 2


@pytest.mark.django_db
def test_a_new_month_warns_again(mailoutbox):
    november = _counter(requests=100)
    quota_warnings_send()
    with time_machine.travel(datetime(2026, 12, 10, tzinfo=UTC), tick=False):
        QuotaCounterFactory(member=november.member, period_start=DEC, requests_used=100, request_limit=100)
        quota_warnings_send()
        quota_warnings_send()
    assert len(mailoutbox) == 2
    assert "2026-12" in mailoutbox[1].subject


@pytest.mark.django_db
def test_the_row_decides_a_warning_already_claimed_is_not_sent(mailoutbox):
    counter = _counter(requests=100)
    QuotaWarning.objects.create(member=counter.member, period_start=NOV, kind="requests", level=100, used=100,
                                limit=100, email="x@example.com")  # another run got there first
    assert quota_warnings_send() == [] and mailoutbox == []


@pytest.mark.django_db
def test_a_failed_send_is_retried_by_the_next_run(mailoutbox, monkeypatch):
    _counter(requests=90)
    import billing.services.warnings as warnings

    real = warnings.send_mail

    def refused(*args, **kwargs):
        raise smtplib.SMTPRecipientsRefused({})

    monkeypatch.setattr(warnings, "send_mail", refused)
    assert quota_warnings_send() == [] and not QuotaWarning.objects.exists()
    monkeypatch.setattr(warnings, "send_mail", real)
    assert len(quota_warnings_send()) == 1 and len(mailoutbox) == 1
    assert QuotaWarning.objects.get().sent_at is not None
