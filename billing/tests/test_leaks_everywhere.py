"""The canary key and prompt of test_leaks, followed past the gateway: e-mails, pages, API, worker and Django logs.

After the canary traffic (proxy/gateway/tests/test_leaks.py's `_every_path`: every /v1 outcome),
the team's month is closed and finalized and its statements leave through a real Celery worker
(logging at DEBUG) to a real SMTP server on loopback, with the quota warning of the member who
hit his quota; an invitation and a password reset go out from the pages. Then every page a
member and a team admin can see and the management API's JSON are fetched (the API also with
the canary key itself as the Bearer token, and with the prompt as one). Nowhere may the raw
key (or its secret part after the display prefix) or the prompt appear: not in a received
message (headers and every MIME part, decoded), a page, a JSON body, the worker's log, this
process's log at DEBUG, the gateway's log (the same pages are also fetched from it over HTTP),
nor, after all this, the database (pg_dump) or Redis (cache, sessions' throttles, the broker's
messages). Each place is also shown to hold this traffic (the key's prefix, the request count,
the tokens, the invoice), so an empty page cannot pass; the key's label, user-chosen and shown
by design, is a control that the same searches do find what is there.
"""
import csv
import email.policy
import io
import logging
import re
import zoneinfo
from datetime import datetime, timedelta

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.test import Client, override_settings
from django.utils import timezone

from billing.models import BillingPeriod, UsageRecord
from billing.selectors import BILLED_STATUSES
from billing.money import format_money
from billing.services import period_close
from billing.tasks import period_finalize_task, quota_warnings_task
from billing.tests.test_month_end_to_end import PUBLIC_URL, month_workers, smtp  # noqa: F401 - fixtures
from proxy.gateway.tests.conftest import MODEL, gateway, sim, wait_for  # noqa: F401 - fixtures
from proxy.gateway.tests.test_leaks import (  # noqa: F401 - fixture
    PROMPT, _database_dump, _every_path, _redis_dump, canary_world)
from tenants.models import ApiKey, Member, QuotaReservation
from tenants.periods import next_period_start
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


def _text(html: str) -> str:
    """A page's words, one space apart."""
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


class Fetch:
    """Each URL twice, as the same user: through Django's test client (this process, whose logging is captured)
    and over HTTP from the running qwenhub.asgi server (the gateway's process, logging at DEBUG)."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.bodies: dict[str, str] = {}

    def __call__(self, name: str, client: Client, url: str, status: int = 200, **meta) -> str:
        local = _get(client, url, status, **meta)
        headers = {key.removeprefix("HTTP_").replace("_", "-"): value for key, value in meta.items()}
        cookies = {key: morsel.value for key, morsel in client.cookies.items()}
        with httpx.Client(base_url=self.base_url, cookies=cookies, timeout=30) as http:
            served = http.get(url, headers=headers)
        assert served.status_code == status, (url, served.status_code, served.text[:500])
        self.bodies[name], self.bodies[f"{name} (served)"] = local, served.text
        return local

    def same_traffic(self, prefix: str) -> None:
        """The served pages show what the test client's do (the same rows, the key's prefix)."""
        for name, local in list(self.bodies.items()):
            if name.endswith("(served)"):
                continue
            served = self.bodies[f"{name} (served)"]
            assert len(REQUEST_ROW.findall(served)) == len(REQUEST_ROW.findall(local)), name
            assert (prefix in served) == (prefix in local), name
            if "csv" in name:
                assert served.count("\n") == local.count("\n"), name


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
    # rows of the key's requests: the two successes, the temperature passed on, the disconnect, the 502, the 503
    assert wait_for(lambda: world.member.usage_records.count() == 6, timeout=15), world.member.usage_records.count()
    assert wait_for(lambda: not QuotaReservation.objects.filter(counter__member__team=team).exists(), timeout=15)
    User = get_user_model()
    over = Member.objects.select_related("user").get(user__username=f"{world.member.user.username}-over")
    User.objects.filter(pk=over.user_id).update(email="over@example.org")  # so his quota warning has somewhere to go
    world.member.user.set_password("pw-for-tests")
    world.member.user.save(update_fields=["password"])  # a reset is e-mailed to usable passwords only
    admin = member_add(team=team, username=f"{team.slug}-admin", email="admin@example.org", role=Member.Role.ADMIN)
    ApiKey.objects.filter(pk=stored.pk).update(label=LABEL)
    rows = list(UsageRecord.objects.filter(member=world.member))
    (month,) = {r.period_start for r in rows}

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
        fetch = Fetch(world.gateway.url)
        home = _text(fetch("member home", member_client, "/"))
        charged = sum(r.status == "ok" for r in rows)
        assert f"requests {charged} 1,000" in home and f"tokens {sum(r.total_tokens for r in rows)}" in home
        keys = fetch("keys", member_client, "/keys/")
        assert f"<code>{stored.prefix}" in keys and LABEL in keys
        listed = fetch("requests", member_client, "/requests/")
        assert len(REQUEST_ROW.findall(listed)) == len(rows) and stored.prefix in listed
        for status, count in by_status.items():
            assert len(REQUEST_ROW.findall(fetch(f"requests {status}", member_client,
                                                 f"/requests/?status={status}"))) == count, status
        assert REQUEST_ROW.findall(fetch("requests filtered", member_client,
                                         f"/requests/?since={day - timedelta(days=1)}&until={day}&model={MODEL}"))
        fetch("requests bad filter", member_client, f"/requests/?since={day}&until={day - timedelta(days=1)}",
              status=400)
        table = fetch("requests csv", member_client, "/requests.csv")
        assert len(table.splitlines()) == len(rows) + 1
        assert table.count(f",{stored.prefix}") == sum(r.api_key_id == stored.pk for r in rows) > 0
        assert len(fetch("requests csv ok", member_client, "/requests.csv?status=ok").splitlines()) == charged + 1
        assert invoice.number in fetch("invoices", member_client, "/invoices/")
        assert invoice.number in fetch("statement", member_client, f"/invoices/{invoice.pk}/")
        team_home = _text(fetch("team home", admin_client, "/team/"))
        assert f"{world.member.user.username} {charged} / 1,000" in team_home
        fetch("team export", admin_client, "/team/export.csv")
        assert world.member.user.username in fetch("team export month", admin_client,
                                                   f"/team/export.csv?month={month:%Y-%m}")
        detail = fetch("member detail", admin_client, f"/team/members/{world.member.pk}/")
        assert stored.prefix in detail and LABEL in detail
        fetch("periods", admin_client, "/team/periods/")
        assert format_money(invoice.amount, team.currency, "en_US") in fetch("period", admin_client,
                                                                            f"/team/periods/{period.pk}/")

        # -- the management API: by session, by the canary key itself, and with the prompt as a key
        since = int((timezone.now() - timedelta(days=2)).timestamp())  # 7 daily buckets by default
        key_auth = {"HTTP_AUTHORIZATION": f"Bearer {raw_key}"}
        for url in ("/api/v1/me/", "/api/v1/me/keys/", "/api/v1/me/usage/", "/api/v1/me/usage/daily/",
                    "/api/v1/me/invoices/", f"/api/v1/me/invoices/{invoice.pk}/"):
            fetch(f"{url} by key", Client(), url, **key_auth)
            fetch(f"{url} by session", member_client, url)
        listed = fetch.bodies["/api/v1/me/keys/ by key"]
        assert stored.prefix in listed and LABEL in listed
        assert fetch.bodies["/api/v1/me/usage/ by key"].count(f'"model":"{MODEL}"') == sum(
            r.model == MODEL for r in rows) > 0
        base = f"/api/v1/teams/{team.slug}"
        for url in (f"{base}/members/", f"{base}/members/{world.member.pk}/", f"{base}/usage/daily/",
                    f"{base}/periods/", f"{base}/invoices/", f"{base}/invoices/{invoice.pk}/", f"{base}/audit-events/",
                    f"/v1/organization/costs?start_time={since}"):
            fetch(url, admin_client, url)
        usage = fetch("organization usage", admin_client, f"/v1/organization/usage/completions?start_time={since}")
        assert sum(int(n) for n in re.findall(r'"num_model_requests":(\d+)', usage)) == len(
            UsageRecord.objects.filter(team=team, status__in=BILLED_STATUSES))
        fetch("prompt as key", Client(), "/api/v1/me/", status=401, HTTP_AUTHORIZATION=f"Bearer {PROMPT}")
        fetch("wrong key", Client(), "/api/v1/me/", status=401, HTTP_AUTHORIZATION=f"Bearer {raw_key[:-1]}x")
        fetch.same_traffic(stored.prefix)

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
    # this process's records, but the test's own SMTP server (which logs what it receives) and HTTP client
    harness = ("mail.log", "httpx", "httpcore")
    django_log = "\n".join(f"{r.levelname} {r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
                           if not r.name.startswith(harness))
    gateway_log = world.gateway.log_text()
    for log in (django_log, gateway_log):
        assert "Unauthorized: /api/v1/me/" in log  # the refused API calls were logged, in both processes
    # and what all this wrote: the outbox, invoices, sessions, the pages' cache, the broker's messages
    dump, cache = _database_dump(), _redis_dump()
    assert f"\t{stored.prefix}\t" in dump and invoice.number in dump
    assert "_kombu.binding" in cache and "b'qh:1:" in cache  # the broker's and Django's cache keys
    places = {"database": dump, "redis": cache, **{f"mail {i} {m['Subject']}": _mail_text(m) for i, m in enumerate(messages)},
              **{f"page {name}": text for name, text in fetch.bodies.items()},
              "worker log": worker_log, "django log": django_log, "gateway log": gateway_log}
    for where, text in places.items():
        assert PROMPT not in text, f"the canary prompt is in the {where}"
        assert raw_key not in text and secret not in text, f"the canary key is in the {where}"
    assert BillingPeriod.objects.get(pk=period.pk).status == "finalized"
