"""The whole billing month through a real Celery worker on the Redis broker and a real SMTP server.

close → drafts → the real cost entered → finalize after the review window → statements received
by aiosmtpd on loopback, checked for amounts, the CSV attachment and the link; the worker killed
while a statement is on the wire, restarted: no statement twice, the interrupted one flagged for
an admin's deliberate resend, the rest sent by the new worker.

How time is handled: the worker is another process, so time-machine in this process does not move
its clock. The month billed is November 2026, in the past in real time, so the close (which checks
"the month is over" against the real clock) may run. The schedule's decisions, which depend on the
hour (is a team's midnight past? is the review window over?), are taken at the test's moved time:
the test travels with time-machine and hands its clock to the due tasks as their `now` argument
(the beat passes none). Dates the worker writes (closed_at, issued_at, sent_at) are real time, so
the review window is measured from the real closed_at. Month edges are tested in test_tasks.py.
"""
import asyncio
import csv
import io
import os
import re
import subprocess
import sys
import threading
import time
import uuid
import zoneinfo
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import time_machine
from django.conf import settings
from django.db import connection
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from billing.models import BillingPeriod, Invoice, StatementEmail
from billing.money import format_money
from billing.services import billing_policy_update, period_set_actual_cost
from billing.services.statements import INTERRUPTED
from billing.tasks import period_statements_send_task, periods_close_due_task, periods_finalize_due_task
from billing.tests.conftest import Inbox, _free_port
from billing.tests.factories import MemberJoinedFactory, usage
from qwenhub.celery import app as celery_app
from tenants.models import AuditEvent, Member
from tenants.tests.factories import TeamFactory, UserFactory
from tenants.tests.utils import run_command

D = Decimal
ROOT = Path(__file__).resolve().parents[2]
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
NOV = date(2026, 11, 1)
PUBLIC_URL = "https://hub.example.org"
WAIT = 30  # seconds, the bound of every wait (a worker starts in a few seconds)


# --- a real SMTP server that can hold a message on the wire ------------------------------

class HoldingInbox(Inbox):
    """Accepts and records every message; the `hold_at`-th one it records, then delays its reply until released.

    The message is recorded before the reply: like a real server, it has the mail when the
    client dies waiting for the "250" — the sender cannot know whether it left.
    """

    def __init__(self):
        super().__init__()
        self.hold_at = None
        self.holding = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server, session, envelope):
        reply = await super().handle_DATA(server, session, envelope)
        if self.hold_at is not None and len(self.received) == self.hold_at:
            self.hold_at = None
            self.holding.set()
            deadline = time.monotonic() + WAIT
            while not self.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the server's event loop keeps serving other sessions
        return reply


@pytest.fixture
def smtp():
    from aiosmtpd.controller import Controller

    inbox = HoldingInbox()
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox, port
    finally:
        inbox.release.set()
        controller.stop()


# --- real workers ------------------------------------------------------------------------

SUCCEEDED = re.compile(r"Task (billing\.tasks\.\w+)\[([0-9a-f-]+)\] succeeded in [0-9.]+s: (.*)$", re.M)


class Worker:
    """`celery worker --pool solo` on the test's queue, its log in a file."""

    def __init__(self, log_path: Path, env: dict):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "billing.tests.month_worker", "worker", "--pool", "solo",
             "-n", f"{env['QWENHUB_TEST_QUEUE']}-{log_path.stem}@%h", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _until(self, found, what: str):
        deadline = time.monotonic() + WAIT
        while (value := found()) is None:
            assert self.process.poll() is None, f"the worker died waiting for {what}:\n{self.log()[-3000:]}"
            assert " raised unexpected" not in self.log(), f"a task failed waiting for {what}:\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {WAIT} s:\n{self.log()[-3000:]}"
            time.sleep(0.1)
        return value

    def ready(self) -> None:
        self._until(lambda: True if " ready." in self.log() else None, "ready")

    def result(self, task_id: str) -> str:
        """The repr of what the task returned, once the worker logged its success."""
        def found():
            return next((r for _, tid, r in SUCCEEDED.findall(self.log()) if tid == task_id), None)
        return self._until(found, f"success of {task_id}")

    def results_of(self, name: str, count: int) -> list[str]:
        """What the first `count` runs of task `name` (fanned out by the worker itself) returned."""
        def found():
            runs = [r for task, _, r in SUCCEEDED.findall(self.log()) if task == f"billing.tasks.{name}"]
            return runs if len(runs) >= count else None
        return self._until(found, f"{count} run(s) of {name}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no acknowledgement, the SMTP conversation cut mid-way."""
        self.process.kill()
        self.process.wait(timeout=WAIT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


def _database_url() -> str:
    """The test database (pytest-django's test_<name>), which the worker must use too."""
    db = connection.settings_dict
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture
def month_workers(transactional_db, smtp, tmp_path):
    """start() → a new worker; every worker is stopped (or already killed) at teardown, before the flush."""
    broker = os.environ.get("TEST_CELERY_BROKER_URL") or settings.CELERY_BROKER_URL
    if not broker.startswith(("redis://", "rediss://")):
        pytest.skip("needs Redis as the Celery broker (REDIS_URL or TEST_CELERY_BROKER_URL)")
    _, port = smtp
    queue = f"qh-month-{uuid.uuid4().hex[:8]}"  # this test's own queue: nothing else reads or writes it
    env = {**os.environ, "CELERY_BROKER_URL": broker, "CELERY_TASK_ALWAYS_EAGER": "false",
           "CELERY_RESULT_BACKEND": "", "DATABASE_URL": _database_url(), "CONN_MAX_AGE": "0",
           "SECRET_KEY": "test-only-not-secret", "DEBUG": "false", "EMAIL_URL": f"smtp://127.0.0.1:{port}",
           "QWENHUB_PUBLIC_URL": PUBLIC_URL, "QWENHUB_UPSTREAM_TIMEOUT": "3", "QWENHUB_TEST_QUEUE": queue,
           "PYTHONDONTWRITEBYTECODE": "1"}
    started: list[Worker] = []
    eager = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = False  # this process's apply_async goes to the broker too

    def start() -> Worker:
        started.append(Worker(tmp_path / f"worker{len(started) + 1}.log", env))
        return started[-1]

    def send(task, *args, **kwargs) -> str:
        task_id = str(uuid.uuid4())
        with celery_app.connection_for_write(broker) as conn:
            task.apply_async(args, kwargs, task_id=task_id, queue=queue, connection=conn)
        return task_id

    try:
        yield start, send
    finally:
        celery_app.conf.task_always_eager = eager
        for worker in started:
            worker.stop()


def moved(*args) -> str:
    """The test's clock moved to a Shanghai wall time, as the `now` the due tasks take."""
    with time_machine.travel(datetime(*args, tzinfo=SHANGHAI), tick=False):
        return timezone.now().isoformat()


def moved_to(when: datetime) -> str:
    with time_machine.travel(when, tick=False):
        return timezone.now().isoformat()


def _lab():
    """lab (Asia/Shanghai, CNY, 3000.00 a month, usage policy, 3 days' review): alice (admin), bob, carol."""
    with time_machine.travel(datetime(2026, 11, 2, 9, tzinfo=SHANGHAI), tick=False):  # lab starts in November
        team = TeamFactory(slug="lab", name="Lab", monthly_cost="3000.00", timezone="Asia/Shanghai", currency="CNY")
        alice = MemberJoinedFactory(team=team, user=UserFactory(username="alice"), role=Member.Role.ADMIN)
        bob = MemberJoinedFactory(team=team, user=UserFactory(username="bob"))
        carol = MemberJoinedFactory(team=team, user=UserFactory(username="carol"))
        billing_policy_update(team=team, kind="usage", grace_days=3)
    # alice 5000 weighted tokens on two models, bob 3000 (his rejected request costs nothing), carol none
    usage(alice, NOV, prompt=1000, completion=500, started_at=datetime(2026, 11, 3, 23, 30, tzinfo=SHANGHAI))
    usage(alice, NOV, prompt=2000, completion=1000, started_at=datetime(2026, 11, 4, 0, 30, tzinfo=SHANGHAI))
    usage(alice, NOV, prompt=400, completion=100, model="qwen2.5-72b", started_at=datetime(2026, 11, 4, 9, tzinfo=SHANGHAI))
    usage(bob, NOV, prompt=3000, completion=0, started_at=datetime(2026, 11, 30, 23, 59, 59, tzinfo=SHANGHAI))
    usage(bob, NOV, prompt=999, completion=999, status="rejected")
    return team, {"alice": alice, "bob": bob, "carol": carol}


def _parts(message):
    text = message.get_body(preferencelist=("plain",)).get_content()
    html = message.get_body(preferencelist=("html",)).get_content()
    return text, html, {a.get_filename(): a.get_content() for a in message.iter_attachments()}


def _outbox(period) -> dict:
    """{invoice number or "summary": (status, attempts)}"""
    return {(e.invoice.number if e.invoice_id else "summary"): (e.status, e.attempts)
            for e in StatementEmail.objects.filter(period=period).select_related("invoice")}


@pytest.mark.django_db(transaction=True)  # the worker sees only committed rows
def test_the_whole_month_through_a_real_worker_and_smtp_server_survives_a_killed_worker(month_workers, smtp):
    start, send = month_workers
    inbox, port = smtp
    first = start()  # it boots while the month is written
    team, members = _lab()

    # -- the close: nothing at 23:59 on 30 November in Shanghai, the month closed at 00:05 -------
    assert first.result(send(periods_close_due_task, now=moved(2026, 11, 30, 23, 59))) == "0"
    assert not BillingPeriod.objects.exists()
    assert first.result(send(periods_close_due_task, now=moved(2026, 12, 1, 0, 5))) == "1"
    assert first.results_of("period_close_task", 1) == ["None"]
    period = BillingPeriod.objects.get(team=team)
    assert (period.start, period.status, period.cost) == (NOV, "closed", D("3000.00"))
    drafts = {i.member.user.username: i for i in Invoice.objects.filter(period=period).select_related("member__user")}
    assert {name: (i.amount, i.number) for name, i in drafts.items()} == {
        "alice": (D("1875.00"), None), "bob": (D("1125.00"), None), "carol": (D("0.00"), None)}  # drafts: no number

    # -- the review window: 3 days after the real close; meanwhile the real GPU bill is entered ---
    assert first.result(send(periods_finalize_due_task,
                             now=moved_to(period.closed_at + timedelta(days=3, minutes=-1)))) == "0"
    assert BillingPeriod.objects.get(pk=period.pk).status == "closed"
    period = period_set_actual_cost(period=period, amount="2999.99", actor=members["alice"].user,
                                    reason="the real GPU bill")
    drafts = {i.member.user.username: i.amount for i in Invoice.objects.filter(period=period).select_related("member__user")}
    # 2999.99 × 5/8 = 1874.99375 and × 3/8 = 1124.99625: the cent left goes to the larger remainder, bob's
    assert drafts == {"alice": D("1874.99"), "bob": D("1125.00"), "carol": D("0.00")}

    # -- finalize; the server holds the 2nd statement's reply and the worker is killed meanwhile --
    inbox.hold_at = 2
    assert first.result(send(periods_finalize_due_task, now=moved_to(period.closed_at + timedelta(days=3)))) == "1"
    assert inbox.holding.wait(WAIT), first.log()[-3000:]
    first.kill()
    period.refresh_from_db()
    invoices = list(period.invoices.select_related("member__user").order_by("sequence"))
    numbers = [i.number for i in invoices]
    assert period.status == "finalized" and numbers == ["LAB-2026-11-001", "LAB-2026-11-002", "LAB-2026-11-003"]
    assert _outbox(period) == {numbers[0]: ("sent", 1), numbers[1]: ("sending", 1), numbers[2]: ("pending", 0),
                               "summary": ("pending", 0)}
    assert len(inbox.messages) == 2  # the 2nd left: the killed worker could not know

    # -- a new worker; the next daily run sends what is pending and flags the interrupted one -----
    second = start()
    second.ready()
    inbox.release.set()
    assert second.result(send(periods_finalize_due_task, now=moved_to(period.closed_at + timedelta(days=4)))) == "0"
    assert second.results_of("period_statements_send_task", 1) == ["2"]
    assert _outbox(period) == {numbers[0]: ("sent", 1), numbers[1]: ("needs_attention", 1), numbers[2]: ("sent", 1),
                               "summary": ("sent", 1)}
    interrupted = StatementEmail.objects.get(invoice=invoices[1])
    assert interrupted.last_error == INTERRUPTED.format(attempts=1)
    rows = {e.message_id: e for e in StatementEmail.objects.filter(period=period)}
    ids = inbox.message_ids()
    assert len(ids) == 4 and sorted(ids) == sorted(rows)  # each statement exactly once
    # a rerun sends nothing (the deliberate resend is the admin's)
    assert second.result(send(period_statements_send_task, period.pk)) == "0"
    assert len(inbox.messages) == 4

    # -- what arrived: amounts of the invoices, the CSV of the month, the link --------------------
    by_id = dict(zip(ids, inbox.messages))
    tokens = {"alice": 5000, "bob": 3000, "carol": 0}
    for invoice in invoices:
        email = StatementEmail.objects.get(invoice=invoice)
        message = by_id[email.message_id]
        assert message["To"] == invoice.member.user.email and invoice.number in message["Subject"]
        text, html, attachments = _parts(message)
        amount = format_money(invoice.amount, "CNY", "en_US")
        assert f"Amount due: {amount}" in text and amount in html
        link = PUBLIC_URL + reverse("member:invoice", args=[invoice.pk])
        assert f"Your invoice: {link}" in text and f'href="{link}"' in html
        table = list(csv.DictReader(io.StringIO(attachments[f"usage-{invoice.number}.csv"])))
        total = sum(int(r["total_tokens"]) for r in table)
        assert total == sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in table)
        assert total == tokens[invoice.member.user.username] == sum(
            line.prompt_tokens + line.completion_tokens for line in invoice.lines.filter(kind="usage"))
    assert sum(i.amount for i in invoices) == period.actual_cost == D("2999.99")
    summary = by_id[StatementEmail.objects.get(period=period, kind="summary").message_id]
    assert summary["To"] == members["alice"].user.email
    text, _, attachments = _parts(summary)
    assert format_money(D("2999.99"), "CNY", "en_US") in text and format_money(D("3000.00"), "CNY", "en_US") in text
    assert PUBLIC_URL + reverse("admin:billing_billingperiod_change", args=[period.pk]) in text
    assert list(attachments) == ["focus-lab-2026-11.csv"]

    # -- the admin's deliberate resend of the interrupted statement: same Message-ID, audited -----
    with override_settings(EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend", EMAIL_HOST="127.0.0.1",
                           EMAIL_PORT=port, EMAIL_HOST_USER="", EMAIL_HOST_PASSWORD="", EMAIL_USE_TLS=False,
                           EMAIL_USE_SSL=False, EMAIL_TIMEOUT=10, QWENHUB_PUBLIC_URL=PUBLIC_URL):
        out, _ = run_command("resend_statement", numbers[1], "--reason", "bob never got it")
    assert "attempt 2" in out
    assert inbox.message_ids() == ids + [interrupted.message_id]
    assert _outbox(period)[numbers[1]] == ("sent", 2)
    assert AuditEvent.objects.filter(data__action="billing.statement_resent", reason="bob never got it").count() == 1


def test_a_due_task_refuses_a_now_without_its_offset():
    """A naive `now` would be read in no particular zone: refused before anything is looked at."""
    for task in (periods_close_due_task, periods_finalize_due_task):
        with pytest.raises(ValueError, match="UTC offset"):
            task.run(now="2026-12-01T00:05:00")
