"""Sign-in, sign-out and the failed-sign-in limits (per account, per client address)."""
import logging

import pytest
import time_machine
from django.contrib.auth import SESSION_KEY
from django.core.cache import cache
from django.test import Client

from dashboards.accounts import throttle
from tenants.services import member_add, team_create

pytestmark = pytest.mark.django_db
PASSWORD = "correct-horse-42"


@pytest.fixture
def alice():
    team = team_create(slug="lab", name="The Lab")
    return member_add(team=team, username="alice", email="alice@example.org", password=PASSWORD)


def login(client, username="alice", password=PASSWORD, **extra):
    return client.post("/accounts/login/", {"username": username, "password": password}, **extra)


def test_sign_in_and_out(client, alice):
    response = login(client)
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.session[SESSION_KEY] == str(alice.user.pk)
    assert client.get("/").status_code == 200

    assert client.get("/accounts/logout/").status_code == 405  # sign-out is a POST
    assert SESSION_KEY in client.session
    response = client.post("/accounts/logout/")
    assert response.status_code == 302 and response["Location"] == "/"
    assert SESSION_KEY not in client.session


def test_wrong_password_is_refused_without_saying_which_part(client, alice):
    response = login(client, password="wrong")
    assert response.status_code == 200
    assert "didn't match" in response.content.decode()
    assert SESSION_KEY not in client.session


def test_login_page_renders(client):
    response = client.get("/accounts/login/")
    assert response.status_code == 200 and b'name="username"' in response.content


def test_login_needs_csrf(alice):
    strict = Client(enforce_csrf_checks=True)
    assert login(strict).status_code == 403
    assert SESSION_KEY not in strict.session


def test_logout_needs_csrf(alice):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice.user)
    assert strict.post("/accounts/logout/").status_code == 403
    assert SESSION_KEY in strict.session


def test_account_limit_refuses_even_the_right_password(client, alice, settings):
    for _ in range(settings.QWENHUB_LOGIN_FAILURES_PER_ACCOUNT):
        assert login(client, password="wrong").status_code == 200
    response = login(client)  # the right password, checked only after the limit
    assert response.status_code == 429
    assert "Too many failed sign-ins" in response.content.decode()
    assert SESSION_KEY not in client.session


def test_account_limit_is_checked_before_the_password(client, alice, settings, monkeypatch):
    for _ in range(settings.QWENHUB_LOGIN_FAILURES_PER_ACCOUNT):
        login(client, password="wrong")
    calls = []
    monkeypatch.setattr("django.contrib.auth.authenticate", lambda *a, **k: calls.append(1))
    monkeypatch.setattr("django.contrib.auth.forms.authenticate", lambda *a, **k: calls.append(1))
    assert login(client).status_code == 429
    assert calls == []


def test_account_limit_holds_from_another_address_and_any_case(alice, settings):
    for i in range(settings.QWENHUB_LOGIN_FAILURES_PER_ACCOUNT):
        login(Client(REMOTE_ADDR=f"10.0.0.{i}"), password="wrong")
    assert login(Client(REMOTE_ADDR="10.9.9.9"), username="ALICE ").status_code == 429


def test_success_clears_the_account_counter_but_not_the_address(client, alice, settings):
    settings.QWENHUB_LOGIN_FAILURES_PER_ADDRESS = 6
    for _ in range(settings.QWENHUB_LOGIN_FAILURES_PER_ACCOUNT - 1):
        login(client, password="wrong")
    assert login(client).status_code == 302
    assert cache.get(throttle.account_key("alice")) is None
    assert cache.get(throttle.address_key("127.0.0.1")) == 4
    client.post("/accounts/logout/")
    # The account starts again (two failures are far from its five), but the address reaches its six.
    login(client, password="wrong")
    login(client, password="wrong")
    assert login(client).status_code == 429


def test_address_limit_covers_many_accounts(alice, settings):
    settings.QWENHUB_LOGIN_FAILURES_PER_ADDRESS = 3
    spray = Client(REMOTE_ADDR="192.0.2.7")
    for name in ("bob", "carol", "dave"):
        assert login(spray, username=name, password="guess").status_code == 200
    assert login(spray).status_code == 429  # alice's right password, from the spraying address
    assert login(Client(REMOTE_ADDR="192.0.2.8")).status_code == 302  # alice elsewhere is fine


def test_x_forwarded_for_is_ignored_unless_trusted(alice, settings):
    settings.QWENHUB_LOGIN_FAILURES_PER_ADDRESS = 2
    for i in range(2):  # rotating the header does not escape the address limit
        login(Client(REMOTE_ADDR="198.51.100.1"), username=f"x{i}", password="guess",
              HTTP_X_FORWARDED_FOR=f"203.0.113.{i}")
    assert login(Client(REMOTE_ADDR="198.51.100.1"), HTTP_X_FORWARDED_FOR="203.0.113.99").status_code == 429


def test_x_forwarded_for_last_entry_when_trusted(rf, settings):
    settings.QWENHUB_LOGIN_TRUST_X_FORWARDED_FOR = True
    request = rf.post("/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="1.2.3.4, 203.0.113.5")
    assert throttle.client_address(request) == "203.0.113.5"
    settings.QWENHUB_LOGIN_TRUST_X_FORWARDED_FOR = False
    assert throttle.client_address(request) == "10.0.0.1"


def test_empty_username_counts_only_against_the_address(rf, settings):
    request = rf.post("/", REMOTE_ADDR="10.0.0.2")
    throttle.login_failed(request, "  ")
    assert cache.get(throttle.address_key("10.0.0.2")) == 1
    assert cache.get(throttle.account_key("")) is None


def test_fixed_window_keeps_its_expiry(rf, settings):
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                                   "LOCATION": "throttle-window"}}
    settings.QWENHUB_LOGIN_FAILURE_WINDOW = 60
    request = rf.post("/", REMOTE_ADDR="10.0.0.3")
    with time_machine.travel("2026-12-02 10:00:00Z", tick=False) as clock:
        for _ in range(5):
            throttle.login_failed(request, "alice")
        assert throttle.login_limited(request, "alice")
        clock.shift(59)
        throttle.login_failed(request, "alice")  # a failure late in the window does not extend it
        assert throttle.login_limited(request, "alice")
        clock.shift(2)
        assert not throttle.login_limited(request, "alice")


def test_no_password_in_logs(client, alice, caplog):
    caplog.set_level(logging.DEBUG)
    for _ in range(6):
        login(client, password="hunter2-secret")
    login(client)
    assert "hunter2-secret" not in caplog.text and PASSWORD not in caplog.text


def test_login_page_queries(client, django_assert_num_queries):
    with django_assert_num_queries(0):
        assert client.get("/accounts/login/").status_code == 200
