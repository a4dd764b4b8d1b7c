"""The member's keys: create (the raw key shown once), revoke (POST only, CSRF, only their own), last used."""
import re
from datetime import datetime, timedelta, timezone

import pytest
from django.test import Client

from tenants.keys import api_key_hash
from tenants.models import ApiKey, AuditEvent
from tenants.services import api_key_issue, api_key_revoke
from tenants.tests.factories import MemberFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def people():
    team = TeamFactory(slug="lab", name="Lab")
    alice = MemberFactory(team=team, user=UserFactory(username="alice"))
    bob = MemberFactory(team=team, user=UserFactory(username="bob"))
    return alice, bob


def _raw_key(page: str) -> str:
    return re.search(r'<code id="raw-key">(.*?)</code>', page).group(1)


def test_create_shows_the_raw_key_once_and_stores_only_its_hash(client, people):
    alice, _ = people
    client.force_login(alice.user)
    response = client.post("/keys/new/", {"label": "laptop", "expires_days": "30"})
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    raw = _raw_key(response.content.decode())
    key = ApiKey.objects.get(member=alice)
    assert key.label == "laptop" and key.key_hash == api_key_hash(raw) and raw.startswith(key.prefix)
    assert timedelta(days=29, hours=23) < key.expires_at - key.created_at <= timedelta(days=30, seconds=5)
    # never again: not on the keys page, the overview, nor anywhere in the session
    assert raw not in client.get("/keys/").content.decode() and raw not in client.get("/").content.decode()
    assert raw not in str(dict(client.session.items()))
    event = AuditEvent.objects.get(member=alice, kind=AuditEvent.Kind.KEY_ISSUED)
    assert event.actor == alice.user and event.subject_id == key.pk and raw not in str(event.data)


def test_create_without_label_or_expiry(client, people):
    alice, _ = people
    client.force_login(alice.user)
    assert client.post("/keys/new/", {"label": "", "expires_days": ""}).status_code == 200
    key = ApiKey.objects.get(member=alice)
    assert key.label == "" and key.expires_at is None


@pytest.mark.parametrize("days, error", [
    ("0", "greater than or equal to 1"), ("-3", "greater than or equal to 1"),
    ("99999", "less than or equal to 3650"), ("soon", "Enter a whole number"),
])
def test_create_refuses_a_bad_expiry_with_a_form_error(client, people, days, error):
    alice, _ = people
    client.force_login(alice.user)
    response = client.post("/keys/new/", {"label": "x", "expires_days": days})
    assert response.status_code == 400 and error in response.content.decode()
    assert not ApiKey.objects.exists()


def test_create_refuses_a_label_too_long(client, people):
    alice, _ = people
    client.force_login(alice.user)
    response = client.post("/keys/new/", {"label": "x" * 101})
    assert response.status_code == 400 and not ApiKey.objects.exists()


def test_create_ignores_fields_a_member_may_not_set(client, people):
    alice, bob = people
    client.force_login(alice.user)
    client.post("/keys/new/", {"label": "mine", "member": bob.pk, "member_id": bob.pk, "revoked_at": "2020-01-01",
                               "key_hash": "x", "prefix": "qh_evil"})
    key = ApiKey.objects.get()
    assert key.member == alice and key.revoked_at is None and key.prefix != "qh_evil"


def test_keys_page_lists_only_my_keys_with_last_use_and_state(client, people):
    alice, bob = people
    used, _ = api_key_issue(member=alice, label="used-one")
    ApiKey.objects.filter(pk=used.pk).update(last_used_at=datetime(2026, 11, 3, 2, 5, tzinfo=timezone.utc))
    gone, _ = api_key_issue(member=alice, label="gone-one")
    api_key_revoke(key=gone)
    api_key_issue(member=bob, label="bobs-key")
    client.force_login(alice.user)
    page = client.get("/keys/").content.decode()
    rows = re.findall(r'<tr class="key">(.*?)</tr>', page, re.S)
    assert len(rows) == 2 and "bobs-key" not in page
    used_row = next(r for r in rows if "used-one" in r)
    assert "2026-11-03 10:05" in used_row  # Shanghai time
    assert "revoked" in next(r for r in rows if "gone-one" in r)
    assert "Revoke" in used_row and "Revoke" not in next(r for r in rows if "gone-one" in r)


def test_revoke_my_key_by_post(client, people):
    alice, _ = people
    key, _ = api_key_issue(member=alice, label="old")
    client.force_login(alice.user)
    response = client.post(f"/keys/{key.pk}/revoke/", follow=True)
    assert response.redirect_chain == [("/keys/", 302)]
    key.refresh_from_db()
    assert key.revoked_at is not None and "is revoked" in response.content.decode()
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.KEY_REVOKED)
    assert event.actor == alice.user and event.member == alice and event.reason
    # twice: told so, nothing more written
    response = client.post(f"/keys/{key.pk}/revoke/", follow=True)
    assert "already revoked" in response.content.decode()
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.KEY_REVOKED).count() == 1


def test_another_members_key_is_a_404_and_stays_valid(client, people):
    alice, bob = people
    key, _ = api_key_issue(member=bob, label="bobs")
    client.force_login(alice.user)
    assert client.post(f"/keys/{key.pk}/revoke/").status_code == 404
    assert client.post("/keys/999999/revoke/").status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None and not AuditEvent.objects.filter(kind=AuditEvent.Kind.KEY_REVOKED).exists()


def test_a_key_of_my_other_team_is_a_404_on_this_team(client, people):
    alice, _ = people
    other = MemberFactory(team=TeamFactory(slug="zzz-other"), user=alice.user)
    key, _ = api_key_issue(member=other, label="other-team")
    client.force_login(alice.user)  # the pages show "lab" (first by slug)
    assert client.post(f"/keys/{key.pk}/revoke/").status_code == 404


def test_get_on_post_only_actions_is_405(client, people):
    alice, _ = people
    key, _ = api_key_issue(member=alice)
    client.force_login(alice.user)
    assert client.get(f"/keys/{key.pk}/revoke/").status_code == 405
    assert client.get("/keys/new/").status_code == 405
    key.refresh_from_db()
    assert key.revoked_at is None and ApiKey.objects.count() == 1


def test_csrf_is_enforced_on_create_and_revoke(people):
    alice, _ = people
    key, _ = api_key_issue(member=alice)
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice.user)
    assert client.post("/keys/new/", {"label": "x"}).status_code == 403
    assert client.post(f"/keys/{key.pk}/revoke/").status_code == 403
    key.refresh_from_db()
    assert key.revoked_at is None and ApiKey.objects.count() == 1
    # with the page's token it works
    page = client.get("/keys/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    assert client.post("/keys/new/", {"label": "x", "csrfmiddlewaretoken": token}).status_code == 200


def test_anonymous_cannot_create_or_revoke(client, people):
    alice, _ = people
    key, _ = api_key_issue(member=alice)
    assert client.post("/keys/new/", {"label": "x"}).status_code == 302
    assert client.post(f"/keys/{key.pk}/revoke/").status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is None and ApiKey.objects.count() == 1


def test_keys_page_query_count_is_bounded(client, people, django_assert_num_queries):
    alice, _ = people
    client.force_login(alice.user)
    with django_assert_num_queries(4):  # session, user, memberships, keys
        client.get("/keys/")
    for n in range(20):
        api_key_issue(member=alice, label=f"k{n}")
    with django_assert_num_queries(4):
        client.get("/keys/")
