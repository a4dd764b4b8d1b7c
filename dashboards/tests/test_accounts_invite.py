"""Invitations: the service, the admin's form, and the invited person's set-password link."""
import logging
import re
from datetime import timedelta

import pytest
import time_machine
from django.contrib.auth import SESSION_KEY, get_user_model
from django.core import mail
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone

from tenants.models import AuditEvent, Member
from tenants.services import INVITE_TOKENS, member_add, member_invite, team_create

pytestmark = pytest.mark.django_db
User = get_user_model()
PUBLIC = "https://qwenhub.example.org"
LINK = re.compile(r"https://qwenhub\.example\.org(/accounts/invite/[^/\s]+/[^/\s]+/)")


@pytest.fixture(autouse=True)
def _public_url(settings):
    settings.QWENHUB_PUBLIC_URL = PUBLIC + "/"
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


@pytest.fixture
def team():
    return team_create(slug="lab", name="The Lab")


@pytest.fixture
def boss(team):
    return member_add(team=team, username="boss", email="boss@example.org", password="boss-pass-123",
                      role=Member.Role.ADMIN)


@pytest.fixture
def admin_client(boss):
    client = Client()
    client.force_login(boss.user)
    return client


def invite(client, **fields):
    data = {"email": "new@example.org", "username": "newbie", "role": "member", "request_quota": "",
            "token_quota": "", "reason": ""}
    data.update(fields)
    return client.post("/accounts/invite/", data)


def invite_path(message) -> str:
    match = LINK.search(message.body)
    assert match, message.body
    html = message.alternatives[0][0]
    assert PUBLIC + match.group(1) in html
    return match.group(1)


# --- the service ----------------------------------------------------------------------


def test_member_invite_creates_user_member_audit_and_mail_on_commit(team, boss, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        member = member_invite(team=team, email="New@Example.org", username="newbie", role=Member.Role.MEMBER,
                               request_quota=100, token_quota=5000, actor=boss.user, reason="new student")
        assert mail.outbox == []  # nothing leaves before the commit
    assert len(callbacks) == 1
    assert member.team == team and (member.request_quota, member.token_quota) == (100, 5000)
    assert not member.user.has_usable_password() and member.user.email == "New@example.org"
    kinds = list(AuditEvent.objects.filter(member=member).order_by("pk").values_list("kind", "actor", "reason"))
    assert kinds == [("member_added", boss.user.pk, "new student"), ("member_invited", boss.user.pk, "new student")]
    [message] = mail.outbox
    assert message.to == ["New@example.org"] and "The Lab" in message.subject
    assert "newbie" in message.body and "3 days" in message.body
    assert invite_path(message)


def test_member_invite_refuses_taken_username_and_email(team, boss):
    with pytest.raises(ValidationError) as taken:
        member_invite(team=team, email="x@example.org", username="boss", actor=boss.user)
    assert "username" in taken.value.error_dict
    with pytest.raises(ValidationError) as taken:
        member_invite(team=team, email="BOSS@example.org", username="other", actor=boss.user)
    assert "email" in taken.value.error_dict
    with pytest.raises(ValidationError):
        member_invite(team=team, email="not-an-address", username="other", actor=boss.user)
    assert not User.objects.filter(username="other").exists() and mail.outbox == []
    assert not AuditEvent.objects.filter(kind=AuditEvent.Kind.MEMBER_INVITED).exists()


def test_invite_link_ignores_the_host_header(admin_client, settings, django_capture_on_commit_callbacks):
    settings.ALLOWED_HOSTS = ["*"]  # even where any Host is let through
    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post("/accounts/invite/", {"email": "n@example.org", "username": "n", "role": "member"},
                          HTTP_HOST="evil.example.com", HTTP_X_FORWARDED_HOST="evil.example.com")
    [message] = mail.outbox
    assert "evil" not in message.body and "evil" not in message.alternatives[0][0]
    assert invite_path(message)


# --- the admin's form -----------------------------------------------------------------


def test_admin_sees_the_form_with_role_and_quotas(admin_client):
    page = admin_client.get("/accounts/invite/").content.decode()
    for name in ("email", "username", "role", "request_quota", "token_quota"):
        assert f'name="{name}"' in page


def test_admin_invites(admin_client, team, boss, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = invite(admin_client, role="admin", request_quota="50", token_quota="1000", reason="co-lead")
    assert response.status_code == 302 and response["Location"] == "/accounts/invite/"
    member = Member.objects.get(user__username="newbie")
    assert (member.team, member.role, member.request_quota, member.token_quota) == (team, "admin", 50, 1000)
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.MEMBER_INVITED)
    assert (event.actor, event.team, event.reason) == (boss.user, team, "co-lead")
    assert len(mail.outbox) == 1
    assert "Invitation sent to new@example.org" in admin_client.get("/accounts/invite/").content.decode()


def test_invite_form_ignores_fields_it_does_not_offer(admin_client, team):
    other = team_create(slug="other", name="Other")
    invite(admin_client, team=str(other.pk), is_staff="on", is_superuser="on", weight="99", password="x")
    member = Member.objects.select_related("user").get(user__username="newbie")
    assert member.team == team and member.weight == 1
    assert not member.user.is_staff and not member.user.is_superuser and not member.user.has_usable_password()


@pytest.mark.parametrize("fields, error_field", [
    ({"username": "boss"}, "username"),
    ({"email": "BOSS@example.org"}, "email"),
    ({"email": "not-an-address"}, "email"),
    ({"username": "has space"}, "username"),
    ({"role": "owner"}, "role"),
    ({"request_quota": "-1"}, "request_quota"),
])
def test_invite_form_errors(admin_client, fields, error_field):
    response = invite(admin_client, **fields)
    assert response.status_code == 400
    assert error_field in response.context["form"].errors
    assert list(User.objects.values_list("username", flat=True)) == ["boss"]
    assert not AuditEvent.objects.filter(kind=AuditEvent.Kind.MEMBER_INVITED).exists() and mail.outbox == []


def test_duplicate_username_error_is_the_forms(admin_client):
    response = invite(admin_client, username="boss")
    assert response.context["form"].errors["username"] == ["This username is taken."]
    response = invite(admin_client, email="boss@example.org")
    assert response.context["form"].errors["email"] == ["Someone with this e-mail address already has an account."]


def test_member_cannot_invite(team):
    alice = member_add(team=team, username="alice", password="pw-alice-123")
    client = Client()
    client.force_login(alice.user)
    assert client.get("/accounts/invite/").status_code == 403
    assert invite(client).status_code == 403
    assert not User.objects.filter(username="newbie").exists()


def test_admin_of_another_team_invites_into_their_own(team, admin_client):
    other = team_create(slug="other", name="Other")
    other_admin = member_add(team=other, username="oadmin", password="pw-123456", role=Member.Role.ADMIN)
    client = Client()
    client.force_login(other_admin.user)
    invite(client)
    assert Member.objects.get(user__username="newbie").team == other


def test_anonymous_is_sent_to_login():
    response = Client().get("/accounts/invite/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    assert Client().post("/accounts/invite/", {"email": "a@b.org", "username": "a"}).status_code == 302
    assert not User.objects.filter(username="a").exists()


def test_invite_needs_csrf(boss):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(boss.user)
    assert invite(strict).status_code == 403
    assert not User.objects.filter(username="newbie").exists()


# --- the invited person's link --------------------------------------------------------


@pytest.fixture
def invited(admin_client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        invite(admin_client)
    return Member.objects.select_related("user").get(user__username="newbie"), invite_path(mail.outbox[-1])


def set_password(client, path, password="a-new-long-password-1"):
    response = client.get(path)  # Django moves the token into the session and redirects
    assert response.status_code == 302
    form_url = response["Location"]
    assert form_url.endswith("/set-password/")
    page = client.get(form_url)
    assert page.status_code == 200 and page.context["validlink"]
    return client.post(form_url, {"new_password1": password, "new_password2": password})


def test_invited_sets_password_and_is_signed_in(invited):
    member, path = invited
    client = Client()
    response = set_password(client, path)
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.session[SESSION_KEY] == str(member.user.pk)
    member.user.refresh_from_db()
    assert member.user.check_password("a-new-long-password-1")
    assert client.get("/").status_code == 200
    assert Client().login(username="newbie", password="a-new-long-password-1")


def test_link_works_once(invited):
    _member, path = invited
    set_password(Client(), path)
    again = Client().get(path, follow=True)
    assert again.status_code == 200 and not again.context["validlink"]
    assert "does not work any more" in again.content.decode()


def test_link_expires(invited, settings):
    member, path = invited
    with time_machine.travel(timezone.now() + timedelta(seconds=settings.PASSWORD_RESET_TIMEOUT + 60)):
        response = Client().get(path, follow=True)
    assert response.status_code == 200 and not response.context["validlink"]
    member.user.refresh_from_db()
    assert not member.user.has_usable_password()


def test_link_still_works_just_before_it_expires(invited, settings):
    _member, path = invited
    with time_machine.travel(timezone.now() + timedelta(seconds=settings.PASSWORD_RESET_TIMEOUT - 3600)):
        assert set_password(Client(), path).status_code == 302


@pytest.mark.parametrize("mangle", [
    lambda uid, token: (uid, token[:-1] + ("a" if token[-1] != "a" else "b")),
    lambda uid, token: ("MTIzNDU2Nzg", token),  # another (absent) user id
    lambda uid, token: ("!!!", token),
    lambda uid, token: (uid, "nonsense"),
])
def test_wrong_tokens_get_the_clear_page(invited, mangle):
    member, path = invited
    uid, token = path.strip("/").split("/")[-2:]
    uid, token = mangle(uid, token)
    response = Client().get(f"/accounts/invite/{uid}/{token}/", follow=True)
    assert response.status_code == 200 and not response.context["validlink"]
    response = Client().post(f"/accounts/invite/{uid}/set-password/",
                             {"new_password1": "p-4-evil-one", "new_password2": "p-4-evil-one"})
    assert response.status_code == 200 and not response.context["validlink"]
    member.user.refresh_from_db()
    assert not member.user.has_usable_password()


def test_password_reset_token_is_not_an_invite_token(invited):
    from django.contrib.auth.tokens import default_token_generator

    member, path = invited
    uid = path.strip("/").split("/")[-2]
    reset_token = default_token_generator.make_token(member.user)
    response = Client().get(f"/accounts/invite/{uid}/{reset_token}/", follow=True)
    assert not response.context["validlink"]
    assert INVITE_TOKENS.check_token(member.user, path.strip("/").split("/")[-1])


def test_mismatched_passwords_are_a_form_error(invited):
    member, path = invited
    client = Client()
    form_url = client.get(path)["Location"]
    response = client.post(form_url, {"new_password1": "one-long-password", "new_password2": "another-password"})
    assert response.status_code == 200 and response.context["form"].errors
    member.user.refresh_from_db()
    assert not member.user.has_usable_password()


def test_set_password_needs_csrf(invited):
    member, path = invited
    strict = Client(enforce_csrf_checks=True)
    form_url = strict.get(path)["Location"]
    response = strict.post(form_url, {"new_password1": "a-new-long-password-1", "new_password2": "a-new-long-password-1"})
    assert response.status_code == 403
    member.user.refresh_from_db()
    assert not member.user.has_usable_password()


def test_no_token_or_password_in_logs(admin_client, django_capture_on_commit_callbacks, caplog):
    caplog.set_level(logging.DEBUG)
    with django_capture_on_commit_callbacks(execute=True):
        invite(admin_client)
    path = invite_path(mail.outbox[-1])
    token = path.strip("/").split("/")[-1]
    set_password(Client(), path, password="my-secret-pass-77")
    Client().get(path, follow=True)  # the used link
    assert token not in caplog.text and "my-secret-pass-77" not in caplog.text


def test_invite_mail_failure_is_logged_not_raised(admin_client, settings, django_capture_on_commit_callbacks,
                                                  caplog, monkeypatch):
    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("smtp down")

    monkeypatch.setattr("django.core.mail.EmailMultiAlternatives.send", refuse)
    with django_capture_on_commit_callbacks(execute=True):
        response = invite(admin_client)
    assert response.status_code == 302
    assert Member.objects.filter(user__username="newbie").exists()
    assert "smtp down" in caplog.text


def test_invite_page_queries(admin_client, django_assert_num_queries):
    # session, user, memberships (with teams)
    with django_assert_num_queries(3):
        assert admin_client.get("/accounts/invite/").status_code == 200


# --- an invitation again: the link expired or the e-mail was lost ---------------------------


def test_the_admin_sends_a_fresh_link_that_works_after_the_first_expired(invited, admin_client, settings,
                                                                          django_capture_on_commit_callbacks):
    member, first = invited
    page = admin_client.get(f"/team/members/{member.pk}/").content.decode()
    assert 'id="invitation"' in page and "new@example.org" in page
    later = timezone.now() + timedelta(seconds=settings.PASSWORD_RESET_TIMEOUT + 60)
    with time_machine.travel(later):
        assert not Client().get(first, follow=True).context["validlink"]
        with django_capture_on_commit_callbacks(execute=True):
            response = admin_client.post(f"/team/members/{member.pk}/invite/", follow=True)
        assert "A new invitation was sent to new@example.org." in response.content.decode()
        second = invite_path(mail.outbox[-1])
        assert second != first and mail.outbox[-1].to == ["new@example.org"]
        assert set_password(Client(), second).status_code == 302
    event = AuditEvent.objects.filter(member=member, kind="member_invited").latest("pk")
    assert event.data["resent"] is True and event.actor_id == member.team.members.get(user__username="boss").user_id
    # once the password is set, the card is gone and the action refuses
    assert 'id="invitation"' not in admin_client.get(f"/team/members/{member.pk}/").content.decode()
    sent = len(mail.outbox)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(f"/team/members/{member.pk}/invite/", follow=True)
    assert "has already set a password" in response.content.decode() and len(mail.outbox) == sent


def test_a_suspended_invitee_gets_no_invitation(invited, admin_client, django_capture_on_commit_callbacks):
    member, _ = invited
    Member.objects.filter(pk=member.pk).update(is_active=False)
    sent = len(mail.outbox)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(f"/team/members/{member.pk}/invite/", follow=True)
    assert "is suspended" in response.content.decode() and len(mail.outbox) == sent
    assert 'id="invitation"' not in response.content.decode()


def test_another_teams_admin_cannot_resend(invited):
    member, _ = invited
    other = team_create(slug="other", name="Other")
    admin = member_add(team=other, username="zed", email="zed@example.org", password="zed-pass-123",
                       role=Member.Role.ADMIN)
    client = Client()
    client.force_login(admin.user)
    sent = len(mail.outbox)
    assert client.post(f"/team/members/{member.pk}/invite/").status_code == 404 and len(mail.outbox) == sent


def test_forgot_password_reaches_an_invitee_with_a_fresh_invitation(invited, settings):
    member, first = invited
    later = timezone.now() + timedelta(seconds=settings.PASSWORD_RESET_TIMEOUT + 60)
    with time_machine.travel(later):
        sent = len(mail.outbox)
        response = Client().post("/accounts/password/reset/", {"email": "NEW@example.org"})
        assert response.status_code == 302
        assert len(mail.outbox) == sent + 1
        path = invite_path(mail.outbox[-1])  # an invitation, not a reset link Django would not send
        assert set_password(Client(), path).status_code == 302
    # a member with a password gets Django's reset link, and no invitation
    sent = len(mail.outbox)
    Client().post("/accounts/password/reset/", {"email": "new@example.org"})
    assert len(mail.outbox) == sent + 1 and not LINK.search(mail.outbox[-1].body)
    assert re.search(r"/accounts/password/reset/[^/\s]+/[^/\s]+/", mail.outbox[-1].body)
