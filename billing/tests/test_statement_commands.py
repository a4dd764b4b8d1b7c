"""resend_statement: bad input → a clear message, a non-zero exit, nothing changed."""
from datetime import datetime

import pytest
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from billing.management.commands.resend_statement import INVOICE_UNKNOWN
from billing.models import StatementEmail
from billing.services import (
    STATEMENT_NOT_CREATED, STATEMENT_NOT_FINALIZED, STATEMENT_PENDING, period_close, statement_resend,
)
from billing.tests.conftest import NOV, SHANGHAI, finalized_month
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.models import AuditEvent
from tenants.tests.factories import TeamFactory
from tenants.tests.utils import run_command

pytestmark = pytest.mark.django_db


def _nothing_changed():
    assert not AuditEvent.objects.filter(data__action="billing.statement_resent").exists()


def test_an_unknown_number_is_refused():
    finalized_month()
    with pytest.raises(CommandError) as exc:
        run_command("resend_statement", "LAB-2026-11-999")
    assert str(exc.value) == INVOICE_UNKNOWN.format(number="LAB-2026-11-999")
    _nothing_changed()


def test_a_statement_not_queued_or_still_pending_is_refused(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    period, _ = finalized_month()
    number = period.invoices.order_by("sequence").first().number
    with pytest.raises(CommandError) as exc:
        run_command("resend_statement", number)
    assert str(exc.value) == STATEMENT_NOT_CREATED.format(invoice=number)
    StatementEmail.objects.create(kind="member", team=period.team, period=period,
                                  invoice=period.invoices.get(number=number), message_id="<x@hub>")
    with pytest.raises(CommandError) as exc:
        run_command("resend_statement", number, "--reason", "why not")
    assert str(exc.value) == STATEMENT_PENDING.format(invoice=number)
    assert StatementEmail.objects.get().attempts == 0
    _nothing_changed()


def test_a_draft_has_no_statement():
    team = TeamFactory(slug="lab")
    usage(MemberJoinedFactory(team=team), NOV)
    period = period_close(team=team, start=NOV, now=datetime(2026, 12, 1, 1, tzinfo=SHANGHAI), wait_seconds=0)
    invoice = period.invoices.get()
    with pytest.raises(ValidationError) as exc:
        statement_resend(invoice=invoice, reason="x")
    assert exc.value.messages == [STATEMENT_NOT_FINALIZED.format(invoice=str(invoice))]
    _nothing_changed()
