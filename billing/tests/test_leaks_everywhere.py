"""The canary key and prompt of test_leaks, followed past the gateway: e-mails, pages, API, worker and Django logs.

After the canary traffic (proxy/gateway/tests/test_leaks.py's `_every_path`: every /v1 outcome),
the team's month is closed and finalized and its statements leave through a real Celery worker
(logging at DEBUG) to a real SMTP server on loopback, with the quota warning of the member who
hit his quota; an invitation and a password reset go out from the pages. Then every page a
member and a team admin can see and the management API's JSON are fetched (the API also with
the canary key itself as the Bearer token, and with the prompt as one). Nowhere may the raw
key (or its secret part after the display prefix) or the prompt appear: not in a received
message (headers and every MIME part, decoded), a page, a JSON body, the worker's log, this
process's log at DEBUG, or the gateway's log. Each place is also shown to hold this traffic
(the key's prefix, the request count, the tokens), so an empty page cannot pass.
"""
import csv
import email.policy
import io
import logging
import re
import zoneinfo
from datetime import datetime, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings
from django.utils import timezone

from billing.models import BillingPeriod, UsageRecord
from billing.money import format_money
from billing.services import period_close
from billing.tasks import period_finalize_task, quota_warnings_task
from billing.tests.test_month_end_to_end import PUBLIC_URL, month_workers, smtp  # noqa: F401 - fixtures
from proxy.gateway.tests.conftest import MODEL, gateway, sim, wait_for  # noqa: F401 - fixtures
from proxy.gateway.tests.test_leaks import PROMPT, _every_path, canary_world  # noqa: F401 - fixture
from tenants.models import ApiKey, Member, QuotaReservation
from tenants.periods import next_period_start, period_start_for
from tenants.services import member_add

pytestmark = pytest.mark.django_db(transaction=True)  # the gateway and the worker see only committed rows
STATUSES = [200, 200, 400, 200, 404, 401, 401, 200, 429, 502, 503]  # test_leaks' paths, as it asserts them
# A user-chosen key label is shown by design: a control that the searches below find what is there.
LABEL = "CANARY-LABEL-5e1d-shown-by-design"
REQUEST_ROW = re.compile(r'<tr class="request">')


@pytest.fixture
def debug_workers(monkeypatch, request):
    """test_month_end_to_end's workers, logging at DEBUG (billing.tests.month_worker reads the variable)."""
    monkeypatch.setenv("QWENHUB_TEST_LOG_LEVEL", "DEBUG")
    return request.getfixturevalue("month_workers")


def _mail_text(message) -> str:
    """Everything a reader of the message could see: the headers decoded, every MIME part decoded, the raw text."""
    parts = [f"{name}: {value}" for name, value in message.items()]
    for part in message.walk():
        if part.is_multipart():
            continue
        parts.extend(f"{name}: {value}" for name, value in part.items())
        payload = part.get_payload(decode=True) or b""
        parts.append(payload.decode(part.get_content_charset() or "utf-8", errors="replace"))
    parts.append(message.as_string(policy=email.policy.SMTP))
    return "\n".join(parts)


def _body(response) -> str:
    content = b"".join(response.streaming_content) if response.streaming else response.content
    return content.decode()


def _get(client, url, status=200, **extra):
    response = client.get(url, **extra)
    assert response.status_code == status, (url, response.status_code, _body(response)[:500])
    return _body(response)


def test_canaries_reach_no_email_page_api_response_or_log(canary_world, sim, debug_workers, smtp, caplog):
    world, team = canary_world, canary_world.team
    start, send = debug_workers
    inbox, port = smtp
    worker = start()  # it boots while the traffic runs
    caplog.set_level(logging.DEBUG)
    raw_key = world.key
    stored = ApiKey.objects.get(member=world.member)
    secret = raw_key[len(stored.prefix):]

    # -- the canary traffic (every /v1 outcome), settled -----------------------------------------
    assert _every_path(world, sim) == STATUSES
    assert wait_for(lambda: world.member.usage_records.count() >= 5)
    assert wait_for(lambda: not QuotaReservation.objects.filter(counter__member__team=team).exists(), timeout=15)
    User = get_user_model()
    over = Member.objects.select_related("user").get(user__username=f"{world.member.user.username}-over")
    User.objects.filter(pk=over.user_id).update(email="over@example.org")  # so his quota warning has somewhere to go
    world.member.user.set_password("pw-for-tests")
    world.member.user.save(update_fields=["password"])  # a reset is e-mailed to usable passwords only
    admin = member_add(team=team, username=f"{team.slug}-admin", email="admin@example.org", role=Member.Role.ADMIN)
    ApiKey.objects.filter(pk=stored.pk).update(label=LABEL)
    rows = list(UsageRecord.objects.filter(member=world.member))
    month = period_start_for(team.timezone)

    mail_settings = dict(EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend", EMAIL_HOST="127.0.0.1",
                         EMAIL_PORT=port, EMAIL_HOST_USER="", EMAIL_HOST_PASSWORD="", EMAIL_USE_TLS=False,
                         EMAIL_USE_SSL=False, EMAIL_TIMEOUT=10, QWENHUB_PUBLIC_URL=PUBLIC_URL)
    with override_settings(**mail_settings):
        # -- e-mails: the quota warning and the statements through the worker, the rest from the pages
        assert worker.result(send(quota_warnings_task)) == "1"  # the member who used his one request
        after = datetime.combine(next_period_start(month), datetime.min.time(),
                                 tzinfo=zoneinfo.ZoneInfo(team.timezone)) + timedelta(minutes=10)
        period = period_close(team=team, start=month, now=after, wait_seconds=0)
        assert worker.result(send(period_finalize_task, period.pk)) == "None"
        invoices = list(period.invoices.select_related("member__user").order_by("member_id"))
        assert len(invoices) == 3  # the member, the one over quota, the admin
        assert worker.results_of("period_statements_send_task", 1) == [str(len(invoices) + 1)]  # and the summary
        admin_client, member_client = Client(), Client()
        admin_client.force_login(admin.user)
        member_client.force_login(world.member.user)
        invited = admin_client.post("/accounts/invite/", {"email": "new@example.org", "username": f"{team.slug}-new",
                                                          "role": "member", "reason": "joins"})
        assert invited.status_code == 302, invited.content.decode()[:500]
        reset = Client().post("/accounts/password/reset/", {"email": world.member.user.email})
        assert reset.status_code == 302

        # -- pages: the member's, then the team admin's -----------------------------------------
        period.refresh_from_db()
        invoice = next(i for i in invoices if i.member_id == world.member.pk)
        invoice.refresh_from_db()
        day = timezone.localdate(timezone=zoneinfo.ZoneInfo(team.timezone))
        by_status = {s: sum(r.status == s for r in rows) for s in {r.status for r in rows}}
        pages = {}
        pages["member home"] = _get(member_client, "/")
        pages["keys"] = _get(member_client, "/keys/")
        assert f"<code>{stored.prefix}" in pages["keys"] and LABEL in pages["keys"]
        pages["requests"] = _get(member_client, "/requests/")
        assert len(REQUEST_ROW.findall(pages["requests"])) == len(rows) and stored.prefix in pages["requests"]
        for status, count in by_status.items():
            pages[f"requests {status}"] = _get(member_client, f"/requests/?status={status}")
            assert len(REQUEST_ROW.findall(pages[f"requests {status}"])) == count, status
        pages["requests filtered"] = _get(member_client, f"/requests/?since={day - timedelta(days=1)}&until={day}"
                                                         f"&model={MODEL}")
        assert REQUEST_ROW.findall(pages["requests filtered"])
        pages["requests bad filter"] = _get(member_client, f"/requests/?since={day}&until={day - timedelta(days=1)}",
                                            status=400)
        pages["requests csv"] = _get(member_client, "/requests.csv")
        assert len(pages["requests csv"].splitlines()) == len(rows) + 1
        assert pages["requests csv"].count(f",{stored.prefix}") == sum(r.api_key_id == stored.pk for r in rows) > 0
        pages["requests csv ok"] = _get(member_client, "/requests.csv?status=ok")
        assert len(pages["requests csv ok"].splitlines()) == by_status["ok"] + 1
        pages["invoices"] = _get(member_client, "/invoices/")
        pages["statement"] = _get(member_client, f"/invoices/{invoice.pk}/")
        assert invoice.number in pages["invoices"] and invoice.number in pages["statement"]
        pages["team home"] = _get(admin_client, "/team/")
        assert world.member.user.username in pages["team home"]
        pages["team export"] = _get(admin_client, "/team/export.csv")
        pages["team export month"] = _get(admin_client, f"/team/export.csv?month={month:%Y-%m}")
        assert world.member.user.username in pages["team export month"]
        pages["member detail"] = _get(admin_client, f"/team/members/{world.member.pk}/")
        assert stored.prefix in pages["member detail"] and LABEL in pages["member detail"]
        pages["periods"] = _get(admin_client, "/team/periods/")
        pages["period"] = _get(admin_client, f"/team/periods/{period.pk}/")
        assert format_money(invoice.amount, team.currency, "en_US") in pages["period"]

        # -- the management API: by session, by the canary key itself, and with the prompt as a key
        since = int((timezone.now() - timedelta(days=2)).timestamp())  # 7 daily buckets by default
        key_auth = {"HTTP_AUTHORIZATION": f"Bearer {raw_key}"}
        api = {}
        for url in ("/api/v1/me/", "/api/v1/me/keys/", "/api/v1/me/usage/", "/api/v1/me/usage/daily/",
                    "/api/v1/me/invoices/", f"/api/v1/me/invoices/{invoice.pk}/"):
            api[url] = _get(Client(), url, **key_auth)
            api[f"{url} session"] = _get(member_client, url)
        assert stored.prefix in api["/api/v1/me/keys/"] and LABEL in api["/api/v1/me/keys/"]
        assert api["/api/v1/me/usage/"].count(f'"model":"{MODEL}"') == sum(r.model == MODEL for r in rows) > 0
        base = f"/api/v1/teams/{team.slug}"
        for url in (f"{base}/members/", f"{base}/members/{world.member.pk}/", f"{base}/usage/daily/",
                    f"{base}/periods/", f"{base}/invoices/", f"{base}/invoices/{invoice.pk}/",
                    f"{base}/audit-events/", f"/v1/organization/usage/completions?start_time={since}",
                    f"/v1/organization/costs?start_time={since}"):
            api[url] = _get(admin_client, url)
        usage = api[f"/v1/organization/usage/completions?start_time={since}"]
        assert sum(int(n) for n in re.findall(r'"num_model_requests":(\d+)', usage)) > 0
        api["prompt as key"] = _get(Client(), "/api/v1/me/", status=401, HTTP_AUTHORIZATION=f"Bearer {PROMPT}")
        api["wrong key"] = _get(Client(), "/api/v1/me/", status=401, HTTP_AUTHORIZATION=f"Bearer {raw_key[:-1]}x")

    # -- what was received: every message, decoded -------------------------------------------------
    assert wait_for(lambda: len(inbox.messages) >= len(invoices) + 4, timeout=10)
    messages = inbox.messages
    subjects = sorted(m["Subject"] for m in messages)
    assert len(messages) == len(invoices) + 4, subjects  # statements, summary, quota warning, invitation, reset
    statement = next(m for m in messages if m["To"] == world.member.user.email and invoice.number in m["Subject"])
    table = next(a.get_content() for a in statement.iter_attachments() if a.get_filename().startswith("usage-"))
    tokens = sum(line.prompt_tokens + line.completion_tokens for line in invoice.lines.filter(kind="usage"))
    assert sum(int(r["total_tokens"]) for r in csv.DictReader(io.StringIO(table))) == tokens > 0
    assert any(m["To"] == "over@example.org" for m in messages)  # the quota warning
    assert any("password/reset/" in _mail_text(m) for m in messages)
    assert any("invite/" in _mail_text(m) and m["To"] == "new@example.org" for m in messages)

    # -- nowhere: mail, pages, API, the worker's log, this process's log, the gateway's log ---------
    worker_log = worker.log()
    assert "period_statements_send_task" in worker_log and "DEBUG" in worker_log  # it logged this work, at DEBUG
    django_log = caplog.text
    assert "Unauthorized: /api/v1/me/" in django_log  # the refused API calls were logged
    places = {**{f"mail {i} {m['Subject']}": _mail_text(m) for i, m in enumerate(messages)},
              **{f"page {name}": text for name, text in pages.items()},
              **{f"api {url}": text for url, text in api.items()},
              "worker log": worker_log, "django log": django_log, "gateway log": world.gateway.log_text()}
    for where, text in places.items():
        assert PROMPT not in text, f"the canary prompt is in the {where}"
        assert raw_key not in text and secret not in text, f"the canary key is in the {where}"
    assert BillingPeriod.objects.get(pk=period.pk).status == "finalized"
