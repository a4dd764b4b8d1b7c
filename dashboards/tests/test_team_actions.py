"""The team admin's actions: POST with CSRF, a reason, one service with the admin as actor, the team's objects only."""
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.utils import timezone

from billing.models import BillingPeriod, Invoice
from billing.selectors import current_period_start
from billing.services import period_close
from billing.tests.factories import usage
from qwenhub.celery import app as celery_app
from tenants.models import ApiKey, AuditEvent, Member
from tenants.services import api_key_issue, member_add, team_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def eager():
    """Run enqueued tasks in-process, as the embedded web process does."""
    before = {key: celery_app.conf[key] for key in ("task_always_eager", "task_eager_propagates")}
    celery_app.conf.update(task_always_eager=True, task_eager_propagates=True)
    yield
    celery_app.conf.update(before)


@pytest.fixture
def team():
    return team_create(slug="lab", name="The Lab", timezone_name="Asia/Shanghai", monthly_cost="3000")


@pytest.fixture
def admin(team):
    return member_add(team=team, username="boss", password="pw-boss-123", role=Member.Role.ADMIN)


@pytest.fixture
def alice(team):
    return member_add(team=team, username="alice", password="pw-alice-123", request_quota=100, token_quota=5000)


@pytest.fixture
def admin_client(client, admin):
    client.login(username="boss", password="pw-boss-123")
    return client


@pytest.fixture
def stranger():
    other = team_create(slug="other", name="Other Lab", timezone_name="UTC")
    return member_add(team=other, username="stranger", request_quota=7)


@pytest.fixture
def last_month(team):
    return (current_period_start(team=team) - timedelta(days=1)).replace(day=1)


@pytest.fixture
def closed(team, alice, admin, last_month):
    usage(alice, last_month, prompt=1000, completion=1000)
    usage(admin, last_month, prompt=500, completion=500)
    return period_close(team=team, start=last_month, wait_seconds=0)


LIMITS = {"request_quota": "200", "token_quota": "", "requests_per_minute": "30", "tokens_per_minute": "9000",
          "max_concurrent_requests": "2", "weight": "3", "reason": "thesis deadline"}


# --- member limits ----------------------------------------------------------------------

def test_limits_update_goes_through_the_service_and_the_member_sees_why(admin_client, admin, alice, client):
    response = admin_client.post(f"/team/members/{alice.pk}/limits/", LIMITS)
    assert response.status_code == 302 and response["Location"] == f"/team/members/{alice.pk}/"
    alice.refresh_from_db()
    assert (alice.request_quota, alice.token_quota, alice.requests_per_minute, alice.tokens_per_minute,
            alice.max_concurrent_requests, alice.weight) == (200, None, 30, 9000, 2, 3)
    event = AuditEvent.objects.get(member=alice, kind=AuditEvent.Kind.MEMBER_UPDATED)
    assert event.actor == admin.user and event.reason == "thesis deadline"
    assert event.data["changed"]["weight"] == {"old": 1, "new": 3}

    alice_client = Client()
    alice_client.login(username="alice", password="pw-alice-123")
    page = alice_client.get("/").content.decode()
    assert "thesis deadline" in page and "boss" in page


@pytest.mark.parametrize("field,value", [("request_quota", "-1"), ("weight", "0"), ("weight", "40000"),
                                         ("tokens_per_minute", "many"), ("max_concurrent_requests", "1.5"),
                                         ("reason", ""), ("request_quota", str(2**63))])
def test_limits_bad_numbers_are_form_errors_and_change_nothing(admin_client, alice, field, value):
    response = admin_client.post(f"/team/members/{alice.pk}/limits/", {**LIMITS, field: value})
    assert response.status_code == 400
    assert response.context["limits_form"].errors[field]
    alice.refresh_from_db()
    assert alice.request_quota == 100 and alice.weight == 1
    assert not AuditEvent.objects.filter(member=alice, kind=AuditEvent.Kind.MEMBER_UPDATED).exists()


def test_limits_form_ignores_role_team_and_active(admin_client, alice, stranger):
    admin_client.post(f"/team/members/{alice.pk}/limits/",
                      {**LIMITS, "role": "admin", "team": stranger.team_id, "is_active": "false", "user": "1"})
    alice.refresh_from_db()
    assert alice.role == Member.Role.MEMBER and alice.team.slug == "lab" and alice.is_active
    form = admin_client.get(f"/team/members/{alice.pk}/").context["limits_form"]
    assert set(form.fields) == {"request_quota", "token_quota", "requests_per_minute", "tokens_per_minute",
                                "max_concurrent_requests", "weight", "reason"}


def test_member_page_shows_keys_and_history(admin_client, alice, django_assert_num_queries):
    api_key_issue(member=alice, label="laptop")
    api_key_issue(member=alice, label="cluster")
    admin_client.get(f"/team/members/{alice.pk}/")
    with django_assert_num_queries(6):
        page = admin_client.get(f"/team/members/{alice.pk}/").content.decode()
    assert "laptop" in page and "cluster" in page and page.count("/revoke/") == 2


# --- suspend, reactivate ----------------------------------------------------------------

def test_suspend_then_reactivate(admin_client, admin, alice):
    response = admin_client.post(f"/team/members/{alice.pk}/suspend/", {"reason": "left the lab"})
    assert response.status_code == 302
    alice.refresh_from_db()
    assert not alice.is_active
    assert "suspended" in admin_client.get("/team/").content.decode()
    admin_client.post(f"/team/members/{alice.pk}/reactivate/", {"reason": "came back"})
    alice.refresh_from_db()
    assert alice.is_active
    reasons = list(AuditEvent.objects.filter(member=alice, kind=AuditEvent.Kind.MEMBER_UPDATED)
                   .order_by("pk").values_list("reason", "actor__username"))
    assert reasons == [("left the lab", "boss"), ("came back", "boss")]


def test_suspend_needs_a_reason(admin_client, alice):
    response = admin_client.post(f"/team/members/{alice.pk}/suspend/", {"reason": " "})
    assert response.status_code == 400 and response.context["reason_form"].errors["reason"]
    alice.refresh_from_db()
    assert alice.is_active


def test_admin_cannot_suspend_themselves(admin_client, admin):
    response = admin_client.post(f"/team/members/{admin.pk}/suspend/", {"reason": "oops"})
    assert response.status_code == 400
    admin.refresh_from_db()
    assert admin.is_active


# --- keys -------------------------------------------------------------------------------

def test_revoke_a_key_of_the_team(admin_client, admin, alice):
    key, _raw = api_key_issue(member=alice, label="laptop")
    response = admin_client.post(f"/team/keys/{key.pk}/revoke/", {"reason": "leaked in a notebook"})
    assert response.status_code == 302 and response["Location"] == f"/team/members/{alice.pk}/"
    key.refresh_from_db()
    assert key.revoked_at is not None
    event = AuditEvent.objects.get(member=alice, kind=AuditEvent.Kind.KEY_REVOKED)
    assert event.actor == admin.user and event.reason == "leaked in a notebook"
    # a second revoke is a message, not an error page
    again = admin_client.post(f"/team/keys/{key.pk}/revoke/", {"reason": "again"}, follow=True)
    assert again.status_code == 200 and AuditEvent.objects.filter(kind=AuditEvent.Kind.KEY_REVOKED).count() == 1


def test_revoke_needs_a_reason(admin_client, alice):
    key, _raw = api_key_issue(member=alice)
    assert admin_client.post(f"/team/keys/{key.pk}/revoke/", {}).status_code == 400
    key.refresh_from_db()
    assert key.revoked_at is None


# --- another team's objects, roles, methods, CSRF ---------------------------------------

def test_another_teams_objects_are_404(admin_client, stranger):
    key, _raw = api_key_issue(member=stranger)
    start = (current_period_start(team=stranger.team) - timedelta(days=1)).replace(day=1)
    period = BillingPeriod.objects.create(team=stranger.team, start=start, currency="CNY")
    posts = [(f"/team/members/{stranger.pk}/limits/", LIMITS), (f"/team/members/{stranger.pk}/suspend/",
             {"reason": "x"}), (f"/team/members/{stranger.pk}/reactivate/", {"reason": "x"}),
             (f"/team/keys/{key.pk}/revoke/", {"reason": "x"}),
             (f"/team/periods/{period.pk}/actual-cost/", {"amount": "1", "reason": "x"}),
             (f"/team/periods/{period.pk}/finalize/", {})]
    for url, data in posts:
        assert admin_client.post(url, data).status_code == 404, url
    for url in (f"/team/members/{stranger.pk}/", f"/team/periods/{period.pk}/", "/team/members/999999/"):
        assert admin_client.get(url).status_code == 404, url
    stranger.refresh_from_db()
    key.refresh_from_db()
    assert stranger.request_quota == 7 and stranger.is_active and key.revoked_at is None


def test_a_member_is_403_on_every_action(client, alice, admin):
    key, _raw = api_key_issue(member=admin)
    client.login(username="alice", password="pw-alice-123")
    for url, data in [(f"/team/members/{alice.pk}/limits/", LIMITS),
                      (f"/team/members/{admin.pk}/suspend/", {"reason": "coup"}),
                      (f"/team/keys/{key.pk}/revoke/", {"reason": "x"}),
                      ("/team/periods/close/", {"month": "2020-01"})]:
        assert client.post(url, data).status_code == 403, url
    admin.refresh_from_db()
    assert admin.is_active and not ApiKey.objects.filter(revoked_at__isnull=False).exists()


def test_get_on_actions_is_405(admin_client, alice, closed):
    key, _raw = api_key_issue(member=alice)
    for url in (f"/team/members/{alice.pk}/limits/", f"/team/members/{alice.pk}/suspend/",
                f"/team/members/{alice.pk}/reactivate/", f"/team/keys/{key.pk}/revoke/", "/team/periods/close/",
                f"/team/periods/{closed.pk}/actual-cost/", f"/team/periods/{closed.pk}/finalize/"):
        assert admin_client.get(url).status_code == 405, url
    alice.refresh_from_db()
    assert alice.is_active


def test_csrf_is_enforced(admin, alice):
    client = Client(enforce_csrf_checks=True)
    client.login(username="boss", password="pw-boss-123")
    assert client.post(f"/team/members/{alice.pk}/suspend/", {"reason": "no token"}).status_code == 403
    alice.refresh_from_db()
    assert alice.is_active
    # with the page's token it goes through
    client.get(f"/team/members/{alice.pk}/")
    token = client.cookies["csrftoken"].value
    assert client.post(f"/team/members/{alice.pk}/suspend/", {"reason": "ok", "csrfmiddlewaretoken": token}
                       ).status_code == 302


# --- periods ----------------------------------------------------------------------------

def test_periods_list_and_a_periods_invoices(admin_client, closed, django_assert_num_queries):
    page = admin_client.get("/team/periods/").content.decode()
    assert f"{closed.start:%Y-%m}" in page and "¥3,000.00" in page
    admin_client.get(f"/team/periods/{closed.pk}/")
    with django_assert_num_queries(5):
        response = admin_client.get(f"/team/periods/{closed.pk}/")
    invoices = response.context["invoices"]
    assert len(invoices) == 2 and sum(i.amount for i in invoices) == Decimal("3000.00")
    assert "alice" in response.content.decode() and "boss" in response.content.decode()


def test_actual_cost_recomputes_the_drafts(admin_client, admin, closed):
    response = admin_client.post(f"/team/periods/{closed.pk}/actual-cost/",
                                 {"amount": "2400.50", "reason": "provider invoice 42"})
    assert response.status_code == 302
    closed.refresh_from_db()
    assert closed.actual_cost == Decimal("2400.50")
    assert sum(Invoice.objects.filter(period=closed).values_list("amount", flat=True)) == Decimal("2400.50")
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.ACTUAL_COST_SET)
    assert event.actor == admin.user and event.reason == "provider invoice 42"


@pytest.mark.parametrize("data", [{"amount": "-1", "reason": "x"}, {"amount": "12.345", "reason": "x"},
                                  {"amount": "abc", "reason": "x"}, {"amount": "100", "reason": ""}])
def test_actual_cost_bad_input_is_a_form_error(admin_client, closed, data):
    response = admin_client.post(f"/team/periods/{closed.pk}/actual-cost/", data)
    assert response.status_code == 400 and response.context["cost_form"].errors
    closed.refresh_from_db()
    assert closed.actual_cost is None


def test_actual_cost_of_an_open_period_is_refused(admin_client, team, last_month):
    period = BillingPeriod.objects.create(team=team, start=last_month, currency="CNY")
    response = admin_client.post(f"/team/periods/{period.pk}/actual-cost/", {"amount": "10", "reason": "x"})
    assert response.status_code == 400 and "still open" in str(response.context["cost_form"].non_field_errors())


def test_close_a_month_that_is_over_is_queued_and_done_with_the_admin_as_actor(admin_client, admin, alice, team,
                                                                                last_month, eager):
    usage(alice, last_month, prompt=10, completion=10)
    response = admin_client.post("/team/periods/close/", {"month": f"{last_month:%Y-%m}"}, follow=True)
    assert "queued" in response.content.decode()
    period = BillingPeriod.objects.get(team=team, start=last_month)
    assert period.status == BillingPeriod.Status.CLOSED
    assert AuditEvent.objects.get(kind=AuditEvent.Kind.PERIOD_CLOSED).actor == admin.user


@pytest.mark.parametrize("month,message", [("this", "is not over yet"), ("2026-13", "YYYY-MM"),
                                           ("", "required")])
def test_close_refuses_a_month_not_over_or_malformed(admin_client, team, eager, month, message):
    value = f"{current_period_start(team=team):%Y-%m}" if month == "this" else month
    response = admin_client.post("/team/periods/close/", {"month": value}, follow=True)
    assert message in response.content.decode()
    assert not BillingPeriod.objects.filter(status=BillingPeriod.Status.CLOSED).exists()


def test_close_of_a_closed_month_says_so(admin_client, closed, eager):
    response = admin_client.post("/team/periods/close/", {"month": f"{closed.start:%Y-%m}"}, follow=True)
    assert "already closed" in response.content.decode()
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.PERIOD_CLOSED).count() == 1


def test_finalize_numbers_the_invoices(admin_client, admin, closed, eager, mailoutbox):
    response = admin_client.post(f"/team/periods/{closed.pk}/finalize/", follow=True)
    assert "queued" in response.content.decode()
    closed.refresh_from_db()
    assert closed.status == BillingPeriod.Status.FINALIZED
    numbers = sorted(Invoice.objects.filter(period=closed).values_list("number", flat=True))
    assert numbers == [f"LAB-{closed.start:%Y-%m}-001", f"LAB-{closed.start:%Y-%m}-002"]
    assert numbers[0] in response.content.decode()
    assert AuditEvent.objects.get(kind=AuditEvent.Kind.PERIOD_FINALIZED).actor == admin.user
    # finalized: no more forms, and a second finalize is refused with a message
    again = admin_client.post(f"/team/periods/{closed.pk}/finalize/", follow=True)
    assert "Only a closed period" in again.content.decode()
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.PERIOD_FINALIZED).count() == 1


def test_finalize_of_an_open_period_is_refused(admin_client, team, last_month, eager):
    period = BillingPeriod.objects.create(team=team, start=last_month, currency="CNY")
    admin_client.post(f"/team/periods/{period.pk}/finalize/")
    period.refresh_from_db()
    assert period.status == BillingPeriod.Status.OPEN


def test_periods_page_offers_only_months_that_are_over_and_not_closed(admin_client, team, closed):
    closable = admin_client.get("/team/periods/").context["closable"]
    assert closed.start not in closable and current_period_start(team=team) not in closable
    assert len(closable) == 11 and all(m < timezone.now().date() for m in closable)


def test_periods_list_query_count_does_not_grow_with_periods(admin_client, team, closed, django_assert_num_queries):
    admin_client.get("/team/periods/")
    with django_assert_num_queries(4) as first:
        admin_client.get("/team/periods/")
    for months_ago in range(2, 8):
        start = current_period_start(team=team)
        for _i in range(months_ago):
            start = (start - timedelta(days=1)).replace(day=1)
        BillingPeriod.objects.create(team=team, start=start, currency="CNY")
    with django_assert_num_queries(len(first.captured_queries)):
        response = admin_client.get("/team/periods/")
    assert len(response.context["periods"]) == 7
    assert [p.invoice_count for p in response.context["periods"]][0] == 2
