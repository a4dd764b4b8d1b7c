"""The member's own endpoints: profile, keys, usage (filters, cursor pages), daily usage, issued invoices."""
from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.models import Invoice, UsageRecord
from tenants.keys import api_key_hash
from tenants.models import ApiKey, AuditEvent
from tenants.tests.factories import UsageRecordFactory


def test_profile_has_quota_and_projection(world):
    UsageRecordFactory(member=world.member, prompt_tokens=70, completion_tokens=30, total_tokens=100)
    body = world.client(world.member).get(reverse("api:me")).json()
    assert body["quota"]["request_limit"] == world.member.request_quota
    assert body["projection"]["month"] == f"{world.this_month:%Y-%m}" and body["projection"]["projected"] is True
    assert body["projection"]["billed"] is True and body["projection"]["prompt_tokens"] == 70
    assert Decimal(body["projection"]["amount"]) > 0 and body["projection"]["currency"] == "CNY"
    assert [m["team"] for m in body["memberships"]] == ["lab"]


def test_key_create_returns_the_raw_key_once_and_stores_its_hash(world):
    client = world.client(world.member)
    response = client.post(reverse("api:me-key-create"), {"label": "laptop", "expires_days": 30}, format="json")
    assert response.status_code == 201 and response["Cache-Control"] == "no-store"
    body = response.json()
    key = ApiKey.objects.get(pk=body["id"])
    assert key.key_hash == api_key_hash(body["key"]) and body["key"].startswith(body["prefix"])
    assert key.member == world.member and key.expires_at > timezone.now() + timedelta(days=29)
    assert AuditEvent.objects.filter(kind="key_issued", subject_id=key.pk, actor=world.member.user).exists()
    listed = client.get(reverse("api:me-keys")).json()
    assert {k["id"] for k in listed} == {key.pk, world.member.api_keys.exclude(pk=key.pk).get().pk}
    assert all("key" not in k and "key_hash" not in k for k in listed)


@pytest.mark.parametrize(("body", "field"), [
    ({"label": "x" * 101}, "label"), ({"expires_days": 0}, "expires_days"), ({"expires_days": "soon"}, "expires_days"),
    ({"member": 1}, "member"), ({"label": "a", "team": "other-lab"}, "team"),
])
def test_key_create_rejects_bad_and_forbidden_fields(world, body, field):
    response = world.client(world.member).post(reverse("api:me-key-create"), body, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]
    assert world.member.api_keys.count() == 1


def test_key_revoke_audits_with_reason_and_refuses_twice(world):
    key = world.member.api_keys.get()
    url = reverse("api:me-key-revoke", kwargs={"key_id": key.pk})
    response = world.client(world.member).post(url, {"reason": "leaked"}, format="json")
    assert response.status_code == 200 and response.json()["revoked_at"]
    assert AuditEvent.objects.get(kind="key_revoked", subject_id=key.pk).reason == "leaked"
    # the same key again, through the session (the key itself no longer works): a 400
    client = world.client()
    client.force_login(world.member.user)
    again = client.post(url, {}, format="json")
    assert again.status_code == 400 and "already revoked" in again.json()["error"]["message"]


def test_usage_lists_only_mine_and_filters(world):
    mine = UsageRecordFactory(member=world.member, model="a", status="ok")
    UsageRecordFactory(member=world.member, model="b", status="rejected")
    UsageRecordFactory(member=world.other, model="a")
    client = world.client(world.member)
    rows = client.get(reverse("api:me-usage"), {"since": world.this_month.isoformat()}).json()["results"]
    assert {r["member_id"] for r in rows} == {world.member.pk} and len(rows) == 2
    only = client.get(reverse("api:me-usage"), {"model": "a", "status": "ok",
                                                 "since": world.this_month.isoformat()}).json()["results"]
    assert [r["id"] for r in only] == [mine.pk]
    assert "prompt" not in rows[0] and "messages" not in rows[0]


@pytest.mark.parametrize("query", [{"since": "2026-13-01"}, {"status": "great"},
                                   {"since": "2026-05-02", "until": "2026-05-01"}, {"cursor": "%%%"},
                                   {"page_size": "0"}, {"page_size": "1000"}, {"until": "0001-01-01"}])
def test_usage_rejects_bad_filters(world, query):
    response = world.client(world.member).get(reverse("api:me-usage"), query)
    assert response.status_code == 400 and response.json()["error"]["fields"]


def test_cursor_pages_are_stable_while_rows_are_inserted(world):
    start = timezone.now() - timedelta(hours=1)
    UsageRecord.objects.filter(member=world.member).delete()
    for n in range(25):
        # two rows share each timestamp: the id breaks the tie
        UsageRecordFactory(member=world.member, started_at=start + timedelta(seconds=n // 2))
    expected = list(UsageRecord.objects.filter(member=world.member).order_by("-started_at", "-id")
                    .values_list("id", flat=True))
    client = world.client(world.member)
    seen, url = [], reverse("api:me-usage") + "?page_size=4"
    while url:
        body = client.get(url).json()
        seen += [r["id"] for r in body["results"]]
        # meanwhile the gateway appends newer rows, also at the very timestamp of the page's edge
        UsageRecordFactory(member=world.member)
        UsageRecordFactory(member=world.member, started_at=start + timedelta(seconds=12))
        url = body["next"]
    fresh = set(UsageRecord.objects.filter(member=world.member).values_list("id", flat=True)) - set(expected)
    assert [i for i in seen if i not in fresh] == expected  # every old row once, in order
    assert len(seen) == len(set(seen))


def test_usage_daily_by_model_counts_billed_usage_in_team_days(world):
    from api.tests.conftest import local

    day = world.this_month
    when = local(world.team, day.year, day.month, day.day, 0, 30)  # 00:30 Shanghai = the previous UTC day
    UsageRecordFactory(member=world.member, model="a", started_at=when, prompt_tokens=10, completion_tokens=5)
    UsageRecordFactory(member=world.member, model="a", started_at=when, status="rejected", prompt_tokens=99)
    UsageRecordFactory(member=world.member, model="b", started_at=when, prompt_tokens=1, completion_tokens=1)
    body = world.client(world.member).get(reverse("api:me-usage-daily"), {
        "since": day.isoformat(), "until": (day + timedelta(days=1)).isoformat(), "by": "model"}).json()
    assert body == [
        {"day": day.isoformat(), "model": "a", "requests": 1, "prompt_tokens": 10, "completion_tokens": 5,
         "tokens": 15},
        {"day": day.isoformat(), "model": "b", "requests": 1, "prompt_tokens": 1, "completion_tokens": 1,
         "tokens": 2}]


@pytest.mark.parametrize("query", [{"by": "member"}, {"since": "2020-01-01", "until": "2022-01-01"},
                                   {"until": "2020-01-01", "since": "2020-01-01"}, {"since": "9999-12-31"},
                                   {"until": "0001-01-02"}])
def test_usage_daily_rejects(world, query):
    response = world.client(world.member).get(reverse("api:me-usage-daily"), query)
    assert response.status_code == 400


def test_invoices_are_only_my_issued_ones_with_lines(world):
    client = world.client(world.member)
    listed = client.get(reverse("api:me-invoices")).json()
    issued = Invoice.objects.get(member=world.member, period__start=world.finalized)
    assert [i["id"] for i in listed] == [issued.pk] and listed[0]["number"] == issued.number
    detail = client.get(reverse("api:me-invoice", kwargs={"invoice_id": issued.pk})).json()
    assert Decimal(detail["amount"]) == issued.amount
    assert sum(Decimal(line["amount"]) for line in detail["lines"]) == issued.amount
    draft = Invoice.objects.get(member=world.member, period__start=world.closed)
    assert client.get(reverse("api:me-invoice", kwargs={"invoice_id": draft.pk})).status_code == 404


def test_me_pages_have_a_fixed_query_budget(world, django_assert_num_queries):
    client = world.client(world.member)
    for n in range(3):
        UsageRecordFactory(member=world.member)
    client.get(reverse("api:me-keys"))  # warm the key cache
    with django_assert_num_queries(1):
        client.get(reverse("api:me-usage"))
    with django_assert_num_queries(1):
        client.get(reverse("api:me-invoices"))
