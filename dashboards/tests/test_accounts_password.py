"""Password change, and reset by e-mail with links on QWENHUB_PUBLIC_URL."""
import logging
import re
from datetime import timedelta

import pytest
import time_machine
from django.contrib.auth import SESSION_KEY
from django.core import mail
from django.test import Client
from django.utils import timezone

from tenants.services import member_add, team_create

pytestmark = pytest.mark.django_db
PASSWORD = "old-password-123"
NEW = "brand-new-password-456"
LINK = re.compile(r"https://qwenhub\.example\.org(/accounts/password/reset/[^/\s]+/[^/\s]+/)")


@pytest.fixture(autouse=True)
def _public_url(settings):
    settings.QWENHUB_PUBLIC_URL = "https://qwenhub.example.org"
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


@pytest.fixture
def alice():
    team = team_create(slug="lab", name="The Lab")
    return member_add(team=team, username="alice", email="alice@example.org", password=PASSWORD)


def test_password_change(client, alice):
    client.force_login(alice.user)
    assert client.get("/accounts/password/").status_code == 200
    response = client.post("/accounts/password/", {"old_password": PASSWORD, "new_password1": NEW,
                                                   "new_password2": NEW})
    assert response.status_code == 302 and response["Location"] == "/accounts/password/done/"
    assert client.get("/accounts/password/done/").status_code == 200
    assert SESSION_KEY in client.session  # the session survives its own password change
    alice.user.refresh_from_db()
    assert alice.user.check_password(NEW)


def test_password_change_needs_the_old_password(client, alice):
    client.force_login(alice.user)
    response = client.post("/accounts/password/", {"old_password": "wrong", "new_password1": NEW,
                                                   "new_password2": NEW})
    assert response.status_code == 200 and "old_password" in response.context["form"].errors
    alice.user.refresh_from_db()
    assert alice.user.check_password(PASSWORD)


def test_password_change_needs_sign_in_and_csrf(alice):
    response = Client().get("/accounts/password/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice.user)
    response = strict.post("/accounts/password/", {"old_password": PASSWORD, "new_password1": NEW,
                                                   "new_password2": NEW})
    assert response.status_code == 403
    alice.user.refresh_from_db()
    assert alice.user.check_password(PASSWORD)


def test_reset_mails_a_link_on_the_public_url(client, alice, settings):
    settings.ALLOWED_HOSTS = ["*"]  # even where any Host is let through, the link is not the Host's
    assert client.get("/accounts/password/reset/").status_code == 200
    response = client.post("/accounts/password/reset/", {"email": "alice@example.org"},
                           HTTP_HOST="evil.example.com", HTTP_X_FORWARDED_HOST="evil.example.com")
    assert response.status_code == 302 and response["Location"] == "/accounts/password/reset/sent/"
    [message] = mail.outbox
    assert message.to == ["alice@example.org"] and "evil" not in message.body
    assert LINK.search(message.body) and "3 days" in message.body


def test_reset_for_an_unknown_address_reveals_nothing(client, alice):
    known = client.post("/accounts/password/reset/", {"email": "alice@example.org"}, follow=True)
    unknown = client.post("/accounts/password/reset/", {"email": "nobody@example.org"}, follow=True)
    assert known.status_code == unknown.status_code == 200
    assert known.redirect_chain == unknown.redirect_chain
    csrf = re.compile(rb'name="csrfmiddlewaretoken" value="[^"]+"')
    assert csrf.sub(b"", known.content) == csrf.sub(b"", unknown.content)
    assert len(mail.outbox) == 1


def reset_path(client) -> str:
    client.post("/accounts/password/reset/", {"email": "alice@example.org"})
    return LINK.search(mail.outbox[-1].body).group(1)


def test_reset_link_sets_the_password_once(alice):
    path = reset_path(Client())
    client = Client()
    form_url = client.get(path)["Location"]
    response = client.post(form_url, {"new_password1": NEW, "new_password2": NEW})
    assert response.status_code == 302 and response["Location"] == "/accounts/password/reset/done/"
    assert client.get("/accounts/password/reset/done/").status_code == 200
    alice.user.refresh_from_db()
    assert alice.user.check_password(NEW)
    again = Client().get(path, follow=True)
    assert again.status_code == 200 and not again.context["validlink"]
    assert "does not work any more" in again.content.decode()


def test_reset_link_expires(alice, settings):
    path = reset_path(Client())
    with time_machine.travel(timezone.now() + timedelta(seconds=settings.PASSWORD_RESET_TIMEOUT + 60)):
        response = Client().get(path, follow=True)
    assert response.status_code == 200 and not response.context["validlink"]


def test_reset_does_not_log_the_token(alice, caplog):
    caplog.set_level(logging.DEBUG)
    client = Client()
    path = reset_path(client)
    token = path.strip("/").split("/")[-1]
    client.get(path, follow=True)
    assert token not in caplog.text


def test_reset_needs_csrf(alice):
    strict = Client(enforce_csrf_checks=True)
    assert strict.post("/accounts/password/reset/", {"email": "alice@example.org"}).status_code == 403
    assert mail.outbox == []
