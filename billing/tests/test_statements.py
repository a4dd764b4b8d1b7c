"""period_statements_send and the resend, against a real SMTP server on loopback (aiosmtpd)."""
import csv
import io
import threading
from datetime import datetime
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.core.mail.backends import smtp
from django.db import connection, transaction
from django.urls import reverse

from billing.models import BillingPeriod, Invoice, InvoiceLine, StatementEmail
from billing.money import format_money
from billing.selectors import statement_periods_pending
from billing.services import statements
from billing.services import (
    STATEMENT_PENDING, STATEMENTS_PERIOD_NOT_FINALIZED, period_close, period_statements_send, statement_resend,
)
from billing.tests.conftest import NOV, PUBLIC_URL, SHANGHAI, finalized_month
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.models import AuditEvent
from tenants.tests.factories import TeamFactory
from tenants.tests.utils import run_command

D = Decimal


class WorkerKilled(BaseException):
    """Stands for the process dying (SIGKILL, OOM): nothing in the service may catch it."""


def _by_id(inbox):
    return {m["Message-ID"]: m for m in inbox.messages}


def _parts(message):
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    attachments = {a.get_filename(): a.get_content() for a in message.iter_attachments()}
    return text, html, attachments


@pytest.mark.django_db
def test_a_finalized_month_reaches_every_member_and_the_admins(smtp_server):
    # given a finalized month of three members (alice is the team's admin)
    period, members = finalized_month()
    invoices = list(period.invoices.select_related("member__user").order_by("sequence"))
    # when its statements are sent
    assert period_statements_send(period=period) == 4
    # then each member got one statement and the admins one summary, each with its outbox's Message-ID
    rows = {e.invoice_id: e for e in StatementEmail.objects.filter(period=period)}
    assert all(e.status == "sent" and e.attempts == 1 and e.sent_at for e in rows.values())
    received = _by_id(smtp_server)
    assert sorted(received) == sorted(e.message_id for e in rows.values()) and len(smtp_server.messages) == 4
    assert sum(i.amount for i in invoices) == period.allocated == D("2999.99")
    for invoice in invoices:
        message = received[rows[invoice.pk].message_id]
        assert message["To"] == invoice.member.user.email
        assert invoice.number in message["Subject"]
        text, html, attachments = _parts(message)
        amount = format_money(invoice.amount, "CNY", "en_US")
        assert f"Amount due: {amount}" in text and amount in html
        link = PUBLIC_URL + reverse("member:invoice", args=[invoice.pk])
        assert link == f"{PUBLIC_URL}/invoices/{invoice.pk}/"
        assert link in text and f'href="{link}"' in html
        assert period.explanation in text
        # the CSV: the member's month by day (Shanghai) and model, adding up to the invoice's usage lines
        table = list(csv.DictReader(io.StringIO(attachments[f"usage-{invoice.number}.csv"])))
        lines = invoice.lines.filter(kind=InvoiceLine.Kind.USAGE)
        assert sum(int(r["total_tokens"]) for r in table) == sum(l.prompt_tokens + l.completion_tokens for l in lines)
        if invoice.member == members["alice"]:
            assert [(r["date"], r["model"], r["requests"], r["total_tokens"]) for r in table] == [
                ("2026-11-03", "qwen2.5-7b-instruct", "1", "1500"),
                ("2026-11-04", "qwen2.5-72b", "1", "500"),
                ("2026-11-04", "qwen2.5-7b-instruct", "1", "3000")]
        if invoice.member == members["bob"]:
            assert [(r["date"], r["prompt_tokens"]) for r in table] == [("2026-11-30", "3000")]  # rejected: no
        if invoice.member == members["carol"]:
            assert table == [] and "No usage this month." in text
    summary = received[rows[None].message_id]
    assert summary["To"] == members["alice"].user.email
    text, _, attachments = _parts(summary)
    assert f"Allocated to members: {format_money(D('2999.99'), 'CNY', 'en_US')}" in text
    assert "Planned cost: CN¥3,000.00" in text and "Real cost: CN¥2,999.99 (-CN¥0.01 against the plan)" in text
    assert all(i.number in text for i in invoices)
    assert list(attachments) == ["focus-lab-2026-11.csv"]


@pytest.mark.django_db
def test_sending_twice_sends_nothing_twice(smtp_server):
    period, _ = finalized_month()
    assert period_statements_send(period=period) == 4
    assert period_statements_send(period=period) == 0
    assert len(smtp_server.messages) == 4 and len(set(smtp_server.message_ids())) == 4
    assert StatementEmail.objects.count() == 4 and not statement_periods_pending().exists()


@pytest.mark.django_db
def test_a_worker_killed_mid_send_is_flagged_never_resent_and_the_admin_resends_it_once(smtp_server, monkeypatch):
    period, _ = finalized_month()
    real_send = smtp.EmailBackend.send_messages

    def send_then_die(self, messages):
        real_send(self, messages)  # the mail left...
        raise WorkerKilled()  # ...and the worker died before recording it

    # given a worker killed while sending the first statement
    monkeypatch.setattr(smtp.EmailBackend, "send_messages", send_then_die)
    with pytest.raises(WorkerKilled):
        period_statements_send(period=period)
    monkeypatch.undo()
    first = StatementEmail.objects.get(status="sending")
    assert len(smtp_server.messages) == 1
    # when the task runs again
    assert period_statements_send(period=period) == 3
    # then the interrupted statement is flagged, not sent again; the others went out once
    first.refresh_from_db()
    assert first.status == "needs_attention" and "interrupted" in first.last_error
    assert smtp_server.message_ids().count(first.message_id) == 1 and len(smtp_server.messages) == 4
    assert period_statements_send(period=period) == 0 and len(smtp_server.messages) == 4
    # and an admin's resend sends it once more, with the same Message-ID, audited
    out, _ = run_command("resend_statement", first.invoice.number, "--reason", "the worker died")
    assert out.startswith(f"Sent the statement of {first.invoice.number} again to {first.invoice.member.user.email}")
    first.refresh_from_db()
    assert (first.status, first.attempts, first.last_error) == ("sent", 2, "")
    assert smtp_server.message_ids().count(first.message_id) == 2 and len(smtp_server.messages) == 5
    event = AuditEvent.objects.get(data__action="billing.statement_resent")
    assert (event.reason, event.subject_id, event.data["previous_status"], event.data["sent"]) == (
        "the worker died", first.invoice_id, "needs_attention", True)
    assert period_statements_send(period=period) == 0 and len(smtp_server.messages) == 5


@pytest.mark.django_db
def test_an_smtp_failure_leaves_the_rows_pending_and_a_retry_sends_once(smtp_server):
    period, _ = finalized_month()
    smtp_server.fail = "451 4.3.0 Try again later"
    assert period_statements_send(period=period) == 0
    rows = list(StatementEmail.objects.filter(period=period))
    assert len(rows) == 4 and all(r.status == "pending" and r.attempts == 1 for r in rows)
    assert all("451" in r.last_error and "Try again later" in r.last_error for r in rows)
    assert not any("Amount due" in r.last_error or "CN¥" in r.last_error for r in rows)  # never the body
    assert list(statement_periods_pending()) == [period]
    # a pending statement is not the admin's to resend: the next run sends it
    with pytest.raises(ValidationError) as exc:
        statement_resend(invoice=rows[0].invoice or rows[1].invoice, reason="x")
    assert exc.value.messages[0] == STATEMENT_PENDING.format(invoice=(rows[0].invoice or rows[1].invoice).number)
    smtp_server.fail = None
    assert period_statements_send(period=period) == 4
    assert period_statements_send(period=period) == 0
    assert len(smtp_server.messages) == 4 and len(set(smtp_server.message_ids())) == 4
    assert set(StatementEmail.objects.values_list("status", "attempts", "last_error")) == {("sent", 2, "")}


@pytest.mark.django_db
def test_a_server_that_is_down_is_an_error_on_the_row_not_a_crash(smtp_server, settings):
    period, _ = finalized_month()
    settings.EMAIL_PORT = 1  # nothing listens there
    assert period_statements_send(period=period) == 0
    assert set(StatementEmail.objects.values_list("status", flat=True)) == {"pending"}
    assert all(StatementEmail.objects.values_list("last_error", flat=True))


@pytest.mark.django_db(transaction=True)
def test_two_workers_at_once_send_each_statement_once(smtp_server):
    period, _ = finalized_month()
    barrier, results, errors = threading.Barrier(2), [], []

    def worker():
        try:
            barrier.wait()
            results.append(period_statements_send(period=BillingPeriod.objects.get(pk=period.pk)))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and sum(results) == 4
    assert len(smtp_server.messages) == 4 and len(set(smtp_server.message_ids())) == 4
    assert set(StatementEmail.objects.values_list("status", flat=True)) == {"sent"}
    assert StatementEmail.objects.count() == 4


@pytest.mark.django_db
def test_only_a_finalized_month_has_statements(smtp_server):
    team = TeamFactory(slug="lab")
    usage(MemberJoinedFactory(team=team), NOV)
    period = period_close(team=team, start=NOV, now=datetime(2026, 12, 1, 1, tzinfo=SHANGHAI), wait_seconds=0)
    with pytest.raises(ValidationError) as exc:
        period_statements_send(period=period)
    assert exc.value.messages == [STATEMENTS_PERIOD_NOT_FINALIZED.format(team="lab", month="2026-11")]
    assert not StatementEmail.objects.exists() and not smtp_server.messages
    assert Invoice.objects.get().issued_at is None


@pytest.mark.django_db
def test_a_run_that_sees_a_send_in_flight_flags_it_but_its_worker_still_records_the_send(smtp_server, monkeypatch):
    period, _ = finalized_month()
    real_send = smtp.EmailBackend.send_messages
    flagged = []

    def send_while_another_run_starts(self, messages):
        flagged.append(statements._flag_interrupted(period))  # another worker's run begins meanwhile
        return real_send(self, messages)

    monkeypatch.setattr(smtp.EmailBackend, "send_messages", send_while_another_run_starts)
    assert period_statements_send(period=period) == 4
    assert flagged == [1, 1, 1, 1]  # each row was seen in flight...
    assert set(StatementEmail.objects.values_list("status", flat=True)) == {"sent"}  # ...and recorded as sent
    assert len(smtp_server.messages) == 4
    assert all(m.endswith("@hub.example.org>") for m in smtp_server.message_ids())


@pytest.mark.django_db
def test_a_member_without_an_address_stays_pending_with_the_reason(smtp_server):
    period, members = finalized_month()
    members["carol"].user.email = ""
    members["carol"].user.save(update_fields=["email"])
    assert period_statements_send(period=period) == 3
    row = StatementEmail.objects.get(invoice__member=members["carol"])
    assert (row.status, row.attempts, row.last_error) == ("pending", 0, "no e-mail address: member carol")
    members["carol"].user.email = "carol@example.org"
    members["carol"].user.save(update_fields=["email"])
    assert period_statements_send(period=period) == 1
    assert smtp_server.received[-1][1] == ["carol@example.org"]


@pytest.mark.django_db(transaction=True)
def test_sending_inside_a_transaction_is_refused(smtp_server):
    period, _ = finalized_month()
    with pytest.raises(RuntimeError), transaction.atomic():
        period_statements_send(period=period)
    assert not StatementEmail.objects.exists() and not smtp_server.messages
