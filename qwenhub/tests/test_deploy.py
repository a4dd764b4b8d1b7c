"""Deploy configuration, secure by default: `check --deploy` is clean with only the four production variables."""
import pytest
from django.contrib.auth import get_user_model

from qwenhub.tests.test_settings import run_python
from tenants.tests.factories import MemberFactory

PRODUCTION = {"DEBUG": "false", "SECRET_KEY": "a-real-secret-" + "k" * 50, "ALLOWED_HOSTS": "qwenhub.example.com",
              "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/qwenhub_settings_test",  # never connected to
              "REDIS_URL": "redis://127.0.0.1:6379/12", "QWENHUB_ENV_FILE": ""}
SHOW = ("from django.conf import settings as s; print(s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE, "
        "s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, s.SECURE_PROXY_SSL_HEADER)")


def _show(**env: str) -> str:
    result = run_python(["-c", "import django; django.setup(); " + SHOW], **env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_check_deploy_is_clean_at_warning_level_with_only_the_production_variables():
    result = run_python(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], **PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_still_warns_when_https_is_turned_off():
    """The switch exists for a trusted plain-HTTP network; the deploy check keeps saying what it costs."""
    result = run_python(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], **PRODUCTION,
                        QWENHUB_HTTPS="false")
    assert result.returncode != 0
    for check in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check in result.stderr


def test_production_defaults_are_https_and_each_can_be_turned_off():
    assert _show(**PRODUCTION) == "True True True 31536000 ('HTTP_X_FORWARDED_PROTO', 'https')"
    assert _show(**PRODUCTION, QWENHUB_HTTPS="false") == "False False False 0 None"
    assert _show(**PRODUCTION, SECURE_SSL_REDIRECT="false", SECURE_PROXY_SSL_HEADER="") == (
        "False True True 31536000 None")
    assert _show(**PRODUCTION, SECURE_HSTS_SECONDS="3600", SECURE_PROXY_SSL_HEADER="X-Scheme") == (
        "True True True 3600 ('HTTP_X_SCHEME', 'https')")


def test_the_embedded_default_serves_plain_http():
    """`make run`: DEBUG on, http://127.0.0.1:8000, no redirect, cookies over HTTP."""
    assert _show(QWENHUB_ENV_FILE="") == "False False False 0 None"


def test_csrf_trusted_origins_come_from_the_environment():
    result = run_python(["-c", "import django; django.setup(); from django.conf import settings; "
                         "print(settings.CSRF_TRUSTED_ORIGINS)"], **PRODUCTION,
                        CSRF_TRUSTED_ORIGINS="https://a.example.com,https://b.example.com")
    assert result.stdout.strip() == "['https://a.example.com', 'https://b.example.com']"


@pytest.mark.django_db
def test_production_pages_redirect_to_https_and_send_the_security_headers(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    response = client.get("/accounts/login/")
    assert response.status_code == 301 and response["Location"] == "https://testserver/accounts/login/"
    response = client.get("/accounts/login/", secure=True)
    assert response.status_code == 200
    assert response["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    assert response["X-Frame-Options"] == "DENY" and response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    # behind the TLS proxy: its header says the request was HTTPS
    assert client.get("/accounts/login/", HTTP_X_FORWARDED_PROTO="https").status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("staff", [False, True])
def test_the_admin_refuses_members_who_are_not_staff(client, staff):
    member = MemberFactory()
    get_user_model().objects.filter(pk=member.user_id).update(is_staff=staff)
    client.force_login(member.user)
    response = client.get("/admin/", secure=True)
    if staff:
        assert response.status_code == 200
    else:
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
        assert client.get("/admin/tenants/apikey/", secure=True).status_code == 302
