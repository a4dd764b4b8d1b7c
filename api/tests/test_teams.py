"""A team admin's endpoints: members (update, suspend, reactivate), usage, periods, invoices, audit trail, upstreams."""
from decimal import Decimal

import pytest
from django.urls import reverse

from billing.models import BillingPeriod, Invoice
from tenants.models import AuditEvent, Member, QuotaCounter
from tenants.tests.factories import ModelRouteFactory, UpstreamFactory, UsageRecordFactory


def _url(name, world, **kwargs):
    return reverse(name, kwargs={"slug": world.team.slug, **kwargs})


def test_members_list_is_the_team_only(world):
    body = world.client(world.admin).get(_url("api:team-members", world)).json()
    assert {m["id"] for m in body} == {world.admin.pk, world.member.pk, world.other.pk}


def test_invite_makes_the_membership_and_mails_the_link(world, mailoutbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = world.client(world.admin).post(_url("api:team-member-invite", world), {
            "email": "newcomer@example.org", "username": "newcomer", "token_quota": 50_000, "reason": "new student"},
            format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["username"], body["role"], body["token_quota"], body["request_quota"]) == (
        "newcomer", "member", 50_000, None)
    member = Member.objects.select_related("user").get(pk=body["id"])
    assert member.team == world.team and not member.user.has_usable_password()
    assert AuditEvent.objects.get(kind="member_invited", member=member).actor == world.admin.user
    [mail] = mailoutbox
    assert mail.to == ["newcomer@example.org"] and "/accounts/invite/" in mail.body


def test_an_invitation_sent_again_until_the_password_is_set(world, mailoutbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        body = world.client(world.admin).post(_url("api:team-member-invite", world), {
            "email": "late@example.org", "username": "late"}, format="json").json()
    url = _url("api:team-member-invitation", world, member_id=body["id"])
    with django_capture_on_commit_callbacks(execute=True):
        response = world.client(world.admin).post(url, {"reason": "the link expired"}, format="json")
    assert response.status_code == 202, response.content
    assert len(mailoutbox) == 2 and mailoutbox[1].to == ["late@example.org"] and "/accounts/invite/" in mailoutbox[1].body
    event = AuditEvent.objects.filter(kind="member_invited", member_id=body["id"]).latest("pk")
    assert event.data["resent"] is True and event.reason == "the link expired"
    member = Member.objects.select_related("user").get(pk=body["id"])
    member.user.set_password("now-it-is-set-123")
    member.user.save()
    with django_capture_on_commit_callbacks(execute=True):
        refused = world.client(world.admin).post(url, {}, format="json")
    assert refused.status_code == 400 and "already set a password" in refused.json()["error"]["message"]
    assert len(mailoutbox) == 2


@pytest.mark.parametrize(("body", "field"), [
    ({"email": "x@example.org", "username": "other-user"}, "username"),  # taken (world.other's? see below)
    ({"email": "not-an-address", "username": "fresh"}, "email"),
    ({"email": "x@example.org", "username": "fresh", "team": 2}, "team"),
    ({"email": "x@example.org", "username": "fresh", "is_staff": True}, "is_staff"),
])
def test_invite_refuses_bad_taken_and_forbidden_fields(world, body, field):
    if field == "username":
        body = {**body, "username": world.other.user.username}
    response = world.client(world.admin).post(_url("api:team-member-invite", world), body, format="json")
    assert response.status_code == 400 and field in response.json()["error"]["fields"], response.content
    assert not Member.objects.filter(user__username="fresh").exists()


def test_member_update_applies_only_sent_fields_and_audits(world):
    assert QuotaCounter.objects.get(member=world.member, period_start=world.this_month)  # opened by the close
    url = _url("api:team-member-update", world, member_id=world.member.pk)
    response = world.client(world.admin).post(url, {"token_quota": 5000, "weight": 3, "reason": "thesis"},
                                              format="json")
    assert response.status_code == 200
    member = Member.objects.get(pk=world.member.pk)
    assert (member.token_quota, member.weight, member.request_quota) == (5000, 3, 1000)
    event = AuditEvent.objects.get(kind="member_updated", member=member)
    assert event.actor == world.admin.user and event.reason == "thesis"
    assert set(event.data["changed"]) == {"token_quota", "weight"}
    assert QuotaCounter.objects.get(member=member, period_start=world.this_month).token_limit == 5000  # the open month follows


@pytest.mark.parametrize(("body", "field"), [
    ({"role": "admin"}, "role"), ({"team": 2}, "team"), ({"is_active": False}, "is_active"),
    ({"weight": 0}, "weight"), ({"token_quota": -1}, "token_quota"), ({"requests_per_minute": "many"},
                                                                       "requests_per_minute"),
])
def test_member_update_refuses_bad_and_forbidden_fields(world, body, field):
    url = _url("api:team-member-update", world, member_id=world.member.pk)
    response = world.client(world.admin).post(url, body, format="json")
    assert response.status_code == 400 and field in response.json()["error"]["fields"]
    member = Member.objects.get(pk=world.member.pk)
    assert (member.role, member.weight, member.is_active) == ("member", 1, True)
    assert not AuditEvent.objects.filter(kind="member_updated").exists()


def test_null_means_unlimited(world):
    url = _url("api:team-member-update", world, member_id=world.member.pk)
    assert world.client(world.admin).post(url, {"request_quota": None}, format="json").status_code == 200
    assert Member.objects.get(pk=world.member.pk).request_quota is None


def test_suspend_stops_the_key_and_reactivate_restores_it(world, settings):
    settings.QWENHUB_KEY_CACHE_SECONDS = 0.001
    admin = world.client(world.admin)
    response = admin.post(_url("api:team-member-suspend", world, member_id=world.member.pk),
                          {"reason": "left the lab"}, format="json")
    assert response.status_code == 200 and response.json()["is_active"] is False
    assert AuditEvent.objects.get(kind="member_updated", member=world.member).reason == "left the lab"
    from django.core.cache import cache
    cache.clear()
    assert world.client(world.member).get(reverse("api:me")).status_code == 401
    again = admin.post(_url("api:team-member-suspend", world, member_id=world.member.pk), {}, format="json")
    assert again.status_code == 400
    back = admin.post(_url("api:team-member-reactivate", world, member_id=world.member.pk), {}, format="json")
    assert back.status_code == 200 and back.json()["is_active"] is True
    cache.clear()
    assert world.client(world.member).get(reverse("api:me")).status_code == 200


def test_an_admin_cannot_suspend_themselves(world):
    response = world.client(world.admin).post(_url("api:team-member-suspend", world, member_id=world.admin.pk),
                                              {}, format="json")
    assert response.status_code == 400 and Member.objects.get(pk=world.admin.pk).is_active


def test_team_usage_daily_by_member_counts_each_member(world):
    day = world.this_month
    UsageRecordFactory(member=world.member, prompt_tokens=5, completion_tokens=1)
    UsageRecordFactory(member=world.other, prompt_tokens=7, completion_tokens=2)
    UsageRecordFactory(member=world.member_b, prompt_tokens=100)  # another team
    body = world.client(world.admin).get(_url("api:team-usage-daily", world),
                                         {"by": "member", "since": day.isoformat()}).json()
    assert {(r["username"], r["prompt_tokens"]) for r in body} == {
        (world.member.user.username, 5), (world.other.user.username, 7)}
    assert all(r["model"] is None for r in body)
    assert world.client(world.admin).get(_url("api:team-usage-daily", world), {"by": "team"}).status_code == 400


def test_periods_list_close_queues_the_task(world, queued):
    admin = world.client(world.admin)
    periods = admin.get(_url("api:team-periods", world)).json()
    assert [p["month"] for p in periods] == [f"{world.closed:%Y-%m}", f"{world.finalized:%Y-%m}"]
    response = admin.post(_url("api:team-period-close", world, month=world.open_over))
    assert response.status_code == 202 and response.json() == {
        "month": f"{world.open_over:%Y-%m}", "status": "open", "queued": True}
    assert queued == [("period_close_task", (world.team.pk, world.open_over.isoformat()))]
    done = admin.post(_url("api:team-period-close", world, month=world.closed))
    assert done.status_code == 200 and done.json()["queued"] is False and len(queued) == 1
    running = admin.post(_url("api:team-period-close", world, month=world.this_month))
    assert running.status_code == 400 and "month" in running.json()["error"]["fields"] and len(queued) == 1


def test_a_month_that_is_not_a_month_is_404(world):
    response = world.client(world.admin).post("/api/v1/teams/lab/periods/2026-13/close/")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


def test_finalize_numbers_invoices_audits_and_queues_statements(world, queued):
    admin = world.client(world.admin)
    response = admin.post(_url("api:team-period-finalize", world, month=world.closed))
    assert response.status_code == 200 and response.json()["status"] == "finalized"
    period = BillingPeriod.objects.get(team=world.team, start=world.closed)
    assert not period.invoices.filter(number__isnull=True).exists()
    assert AuditEvent.objects.filter(kind="period_finalized", subject_id=period.pk, actor=world.admin.user).exists()
    assert queued == [("period_statements_send_task", (period.pk,))]
    again = admin.post(_url("api:team-period-finalize", world, month=world.closed))
    assert again.status_code == 200 and len(queued) == 1  # idempotent, nothing queued twice
    assert admin.post(_url("api:team-period-finalize", world, month=world.open_over)).status_code == 404


def test_actual_cost_recomputes_drafts_and_needs_a_reason(world):
    admin = world.client(world.admin)
    url = _url("api:team-period-actual-cost", world, month=world.closed)
    missing = admin.post(url, {"amount": "2500.00"}, format="json")
    assert missing.status_code == 400 and "reason" in missing.json()["error"]["fields"]
    for bad in ("-1", "abc", "1.005"):
        assert admin.post(url, {"amount": bad, "reason": "x"}, format="json").status_code == 400
    response = admin.post(url, {"amount": "2500.00", "reason": "real GPU bill"}, format="json")
    assert response.status_code == 200 and Decimal(response.json()["actual_cost"]) == Decimal("2500")
    drafts = Invoice.objects.filter(period__team=world.team, period__start=world.closed)
    assert sum(i.allocated for i in drafts) == Decimal("2500.00")
    assert AuditEvent.objects.get(kind="actual_cost_set").reason == "real GPU bill"
    finalized = admin.post(_url("api:team-period-actual-cost", world, month=world.finalized),
                           {"amount": "1", "reason": "x"}, format="json")
    assert finalized.status_code == 400 and "finalized" in finalized.json()["error"]["message"]


def test_team_invoices_filter_by_month_and_detail(world):
    admin = world.client(world.admin)
    listed = admin.get(_url("api:team-invoices", world), {"month": f"{world.closed:%Y-%m}"}).json()
    assert len(listed) == 3 and all(i["number"] is None for i in listed)  # drafts
    assert admin.get(_url("api:team-invoices", world), {"month": "2026-1"}).status_code == 400
    invoice = Invoice.objects.filter(team=world.team).first()
    detail = admin.get(_url("api:team-invoice", world, invoice_id=invoice.pk)).json()
    assert detail["id"] == invoice.pk and detail["lines"]


def test_audit_events_are_the_teams_newest_first_in_pages(world):
    admin = world.client(world.admin)
    for n in range(5):
        admin.post(_url("api:team-member-update", world, member_id=world.member.pk), {"weight": n + 2},
                   format="json")
    AuditEvent.objects.create(team=world.team_b, kind="team_updated")
    page = admin.get(_url("api:team-audit-events", world), {"page_size": 3}).json()
    assert len(page["results"]) == 3 and page["next"]
    everything, url = [], _url("api:team-audit-events", world) + "?page_size=3"
    while url:
        body = admin.get(url).json()
        everything += body["results"]
        url = body["next"]
    assert [e["id"] for e in everything] == list(
        AuditEvent.objects.filter(team=world.team).order_by("-created_at", "-pk").values_list("pk", flat=True))
    assert everything[0]["actor"] == world.admin.user.username


def test_upstreams_show_enabled_models_and_health_never_the_vllm_key(world):
    from django.utils import timezone

    from proxy.models import UpstreamHealthSample

    gpu_a = UpstreamFactory(name="gpu-a")
    ModelRouteFactory(upstream=gpu_a)
    UpstreamFactory(name="gpu-b", enabled=False)
    earlier = timezone.now() - timezone.timedelta(minutes=1)
    UpstreamHealthSample.objects.create(upstream=gpu_a, taken_at=earlier, ok=False, error="connection refused")
    UpstreamHealthSample.objects.create(upstream=gpu_a, taken_at=earlier + timezone.timedelta(minutes=1), ok=True,
                                        running=3, waiting=1, kv_cache_usage=0.25, generation_tokens_per_second=812.5,
                                        ttft_mean_seconds=0.12)
    body = world.client(world.admin).get(_url("api:team-upstreams", world)).json()
    health = body[0].pop("health")
    assert body == [
        {"name": "gpu-a", "enabled": True, "max_concurrency": 64, "models": ["qwen2.5-7b-instruct"]},
        {"name": "gpu-b", "enabled": False, "max_concurrency": 64, "models": [], "health": None}]
    assert (health["ok"], health["running"], health["waiting"], health["kv_cache_usage"],
            health["generation_tokens_per_second"], health["ttft_mean_seconds"]) == (True, 3, 1, 0.25, 812.5, 0.12)
    assert "vllm-secret" not in str(body)


def test_admin_pages_have_a_fixed_query_budget(world, django_assert_num_queries):
    admin = world.client(world.admin)
    admin.get(_url("api:team-members", world))  # warm the key cache
    with django_assert_num_queries(1):
        admin.get(_url("api:team-members", world))
    with django_assert_num_queries(1):
        admin.get(_url("api:team-invoices", world))
    with django_assert_num_queries(1):
        admin.get(_url("api:team-audit-events", world))
