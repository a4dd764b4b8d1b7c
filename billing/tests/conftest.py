import email
import email.policy
import socket
import threading
import zoneinfo
from datetime import date, datetime

import pytest
from django.test import override_settings


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """PBKDF2's deliberate slowness would dominate the command and admin tests."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


# --- statements: a finalized month and a real SMTP server on loopback ----------------------

NOV = date(2026, 11, 1)
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
PUBLIC_URL = "https://hub.example.org"


class Inbox:
    """An aiosmtpd handler keeping what it accepted; `fail` set to an SMTP reply refuses every message."""

    def __init__(self):
        self.received = []
        self.fail = None
        self._lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        if self.fail:
            return self.fail
        with self._lock:
            self.received.append((envelope.mail_from, list(envelope.rcpt_tos),
                                  email.message_from_bytes(envelope.content, policy=email.policy.default)))
        return "250 Message accepted for delivery"

    @property
    def messages(self):
        return [m for _, _, m in self.received]

    def message_ids(self):
        return [m["Message-ID"] for m in self.messages]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp_server():
    """A real SMTP server on 127.0.0.1, and Django's SMTP backend pointed at it."""
    from aiosmtpd.controller import Controller

    inbox = Inbox()
    port = _free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        with override_settings(EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend", EMAIL_HOST="127.0.0.1",
                               EMAIL_PORT=port, EMAIL_HOST_USER="", EMAIL_HOST_PASSWORD="", EMAIL_USE_TLS=False,
                               EMAIL_USE_SSL=False, EMAIL_TIMEOUT=10, QWENHUB_PUBLIC_URL=PUBLIC_URL):
            yield inbox
    finally:
        controller.stop()


def finalized_month(*, actual_cost="2999.99", kind="usage", bob_extra=None):
    """lab (Asia/Shanghai, CNY): alice (admin, two models), bob (one model), carol (no usage); Nov 2026 finalized."""
    from billing.services import billing_policy_update, period_close, period_finalize, period_set_actual_cost
    from billing.tests.factories import MemberJoinedFactory, usage
    from tenants.models import Member
    from tenants.tests.factories import TeamFactory, UserFactory

    team = TeamFactory(slug="lab", name="Lab", monthly_cost="3000.00", timezone="Asia/Shanghai", currency="CNY")
    alice = MemberJoinedFactory(team=team, user=UserFactory(username="alice"), role=Member.Role.ADMIN)
    bob = MemberJoinedFactory(team=team, user=UserFactory(username="bob"))
    carol = MemberJoinedFactory(team=team, user=UserFactory(username="carol"))
    billing_policy_update(team=team, kind=kind,
                          public_prices={"qwen2.5-7b-instruct": {"prompt": "0.3", "completion": "0.6"}})
    # alice: Nov 3 late evening and just after midnight (Nov 4 in Shanghai, still Nov 3 in UTC), and a big model
    usage(alice, NOV, prompt=1000, completion=500, started_at=datetime(2026, 11, 3, 23, 30, tzinfo=SHANGHAI))
    usage(alice, NOV, prompt=2000, completion=1000, started_at=datetime(2026, 11, 4, 0, 30, tzinfo=SHANGHAI))
    usage(alice, NOV, prompt=400, completion=100, model="qwen2.5-72b", started_at=datetime(2026, 11, 4, 9, tzinfo=SHANGHAI))
    usage(bob, NOV, prompt=3000, completion=0, started_at=datetime(2026, 11, 30, 23, 59, 59, tzinfo=SHANGHAI))
    usage(bob, NOV, prompt=999, completion=999, status="rejected")  # costs nothing, counted nowhere
    if bob_extra:
        usage(bob, NOV, prompt=bob_extra[0], completion=bob_extra[1])
    period = period_close(team=team, start=NOV, now=datetime(2026, 12, 1, 0, 10, tzinfo=SHANGHAI), wait_seconds=0)
    if actual_cost is not None:
        period = period_set_actual_cost(period=period, amount=actual_cost, reason="the real GPU bill")
    period = period_finalize(period=period)
    return period, {"alice": alice, "bob": bob, "carol": carol}
