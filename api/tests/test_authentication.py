"""Bearer keys (hashed, looked up through tenants.selectors, cached for QWENHUB_KEY_CACHE_SECONDS) and sessions."""
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from tenants.models import ApiKey, Member
from tenants.services import api_key_revoke
from tenants.tests.factories import ApiKeyFactory

ME = reverse("api:me")


def _get(raw: str | None, header: str | None = None):
    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    elif raw is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client.get(ME)


def test_a_key_acts_as_its_membership(world):
    body = _get(world.keys[world.member.pk]).json()
    assert body["username"] == world.member.user.username
    assert body["membership"]["id"] == world.member.pk and body["membership"]["team"] == "lab"


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer a b", "Basic dXNlcjpwYXNz", "Bearer qh_short",
                                    "Bearer qh_" + "A" * 49])
def test_no_or_bad_credentials_are_401_with_the_error_shape(world, header):
    response = _get(None, header=header)
    # Basic is not ours and there is no session: still 401, with our class's challenge
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    error = response.json()["error"]
    assert error["type"] == "authentication_required" and error["message"] and error["fields"] == {}


def test_unknown_key_is_401(world):
    assert _get(ApiKeyFactory.build().raw).status_code == 401


def test_revoked_key_is_refused(world):
    key = world.member.api_keys.get()
    api_key_revoke(key=key)
    response = _get(world.keys[world.member.pk])
    assert response.status_code == 401 and "revoked" in response.json()["error"]["message"]


def test_expired_key_is_refused(world):
    ApiKey.objects.filter(member=world.member).update(expires_at=timezone.now() - timedelta(seconds=1))
    response = _get(world.keys[world.member.pk])
    assert response.status_code == 401 and "expired" in response.json()["error"]["message"]


def test_suspended_member_and_inactive_user_are_refused(world):
    Member.objects.filter(pk=world.member.pk).update(is_active=False)
    assert _get(world.keys[world.member.pk]).status_code == 401
    world.other.user.is_active = False
    world.other.user.save(update_fields=["is_active"])
    assert _get(world.keys[world.other.pk]).status_code == 401


def test_the_lookup_is_cached_for_the_configured_seconds(world, settings, django_assert_num_queries):
    settings.QWENHUB_KEY_CACHE_SECONDS = 60
    raw = world.keys[world.member.pk]
    assert _get(raw).status_code == 200
    # revoked behind the cache's back (no cache delete): still accepted until the entry expires
    ApiKey.objects.filter(member=world.member).update(revoked_at=timezone.now())
    assert _get(raw).status_code == 200
    from django.core.cache import cache
    cache.clear()  # the entry's time is up
    assert _get(raw).status_code == 401


def test_a_cached_hit_costs_no_key_query(world, settings, django_assert_num_queries):
    settings.QWENHUB_KEY_CACHE_SECONDS = 60
    raw = world.keys[world.member.pk]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    url = reverse("api:me-keys")
    client.get(url)
    with django_assert_num_queries(1):  # the list itself only
        assert client.get(url).status_code == 200


def test_unknown_keys_are_cached_too(world, settings, django_assert_num_queries):
    settings.QWENHUB_KEY_CACHE_SECONDS = 60
    raw = ApiKeyFactory.build().raw
    _get(raw)
    with django_assert_num_queries(0):
        assert _get(raw).status_code == 401


def test_session_reads_without_csrf_but_writes_need_it(world):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.member.user)
    assert client.get(ME).status_code == 200
    response = client.post(reverse("api:me-key-create"), {"label": "x"}, content_type="application/json")
    assert response.status_code == 403 and "CSRF" in response.json()["error"]["message"]
    assert not world.member.api_keys.filter(label="x").exists()
    client.get(ME)  # nothing sets the cookie here: fetch a token the way a page would
    from django.middleware.csrf import _get_new_csrf_string, _mask_cipher_secret
    secret = _get_new_csrf_string()
    client.cookies["csrftoken"] = secret
    response = client.post(reverse("api:me-key-create"), {"label": "x"}, content_type="application/json",
                           HTTP_X_CSRFTOKEN=_mask_cipher_secret(secret))
    assert response.status_code == 201


def test_session_picks_the_membership_by_team(world):
    from billing.tests.factories import MemberJoinedFactory

    second = MemberJoinedFactory(user=world.member.user, team=world.team_b)
    client = APIClient()
    client.force_login(world.member.user)
    assert client.get(ME).json()["membership"]["team"] == "lab"  # first by slug
    assert client.get(ME, {"team": "other-lab"}).json()["membership"]["id"] == second.pk
    assert client.get(ME, {"team": "nobody"}).status_code == 404


def test_key_of_a_member_never_acts_for_their_other_team(world):
    from billing.tests.factories import MemberJoinedFactory

    MemberJoinedFactory(user=world.member.user, team=world.team_b, role=Member.Role.ADMIN)
    client = world.client(world.member)
    assert client.get(ME, {"team": "other-lab"}).json()["membership"]["team"] == "lab"
    assert client.get(reverse("api:team-members", kwargs={"slug": "other-lab"})).status_code == 404


def test_throttling_is_per_user_with_the_error_shape(world, monkeypatch):
    from rest_framework.throttling import UserRateThrottle

    monkeypatch.setattr(UserRateThrottle, "THROTTLE_RATES", {"user": "3/minute"})
    member, other = world.client(world.member), world.client(world.other)
    assert [member.get(ME).status_code for _ in range(3)] == [200, 200, 200]
    limited = member.get(ME)
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limited"
    assert int(limited["Retry-After"]) > 0
    assert other.get(ME).status_code == 200  # another user has their own budget
    session = APIClient()
    session.force_login(world.member.user)
    assert session.get(ME).status_code == 429  # the key and the session are the same user
