"""What a statement says: both views of the price, the locale's formats; and the admin's resend action."""
import pytest
from django.core import mail
from django.urls import reverse

from billing.models import StatementEmail
from billing.services import period_statements_send
from billing.tests.conftest import finalized_month
from tenants.models import AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _locmem(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


def test_the_statement_shows_the_effective_and_the_public_price():
    period, members = finalized_month(actual_cost=None)
    assert period_statements_send(period=period) == 4
    bob = next(m for m in mail.outbox if m.to == ["bob@example.com"])
    invoice = period.invoices.get(member=members["bob"])
    # 3000 prompt tokens for 1125.00: 375,000.00 per 1M; at 0.30 per 1M they would cost 0.00
    assert "Effective price under the team's policy: CN¥375,000.00 per 1M tokens (3000 tokens)." in bob.body
    assert "At the team's public API prices the same tokens would have cost CN¥0.00." in bob.body
    assert "qwen2.5-7b-instruct: CN¥0.30 prompt, CN¥0.60 completion per 1M tokens" in bob.body
    assert bob.extra_headers["Message-ID"] == StatementEmail.objects.get(invoice=invoice).message_id
    html = bob.alternatives[0][0]
    assert "CN¥375,000.00" in html and "At the public price" in html
    summary = next(m for m in mail.outbox if "statements for November 2026 are out" in m.subject)
    assert "Real cost: not entered: the planned cost was split" in summary.body


def test_amounts_follow_the_sites_language(settings):
    settings.LANGUAGE_CODE = "de"
    period, _ = finalized_month()
    period_statements_send(period=period)
    alice = next(m for m in mail.outbox if m.to == ["alice@example.com"])
    assert "1.874,99\xa0CN¥" in alice.body and "62,50\xa0%" in alice.body


def test_the_admin_resends_through_the_service(admin_client, admin_user):
    period, _ = finalized_month()
    period_statements_send(period=period)
    row = StatementEmail.objects.get(kind="summary")
    changelist = reverse("admin:billing_statementemail_changelist")
    assert admin_client.get(changelist).status_code == 200
    assert admin_client.get(reverse("admin:billing_statementemail_change", args=[row.pk])).status_code == 200
    selection = {"_selected_action": [row.pk], "action": "resend"}
    assert admin_client.post(changelist, selection).status_code == 200  # asks for the reason
    response = admin_client.post(changelist, {**selection, "apply": "1", "reason": "lost in spam"})
    assert response.status_code == 302
    assert len(mail.outbox) == 5 and mail.outbox[-1].extra_headers["Message-ID"] == row.message_id
    event = AuditEvent.objects.get(data__action="billing.statement_resent")
    assert (event.actor, event.reason, event.data["kind"]) == (admin_user, "lost in spam", "summary")
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("sent", 2)


def test_what_the_same_tokens_would_have_cost_at_the_public_price():
    # bob: 3000 + 2,000,000 prompt and 1,000,000 completion tokens at 0.30 and 0.60 per 1M
    period, members = finalized_month(bob_extra=(2_000_000, 1_000_000))
    period_statements_send(period=period)
    bob = next(m for m in mail.outbox if m.to == ["bob@example.com"])
    assert "At the team's public API prices the same tokens would have cost CN¥1.20." in bob.body
    invoice = period.invoices.get(member=members["bob"])
    assert f"({invoice.lines.get().public_price_amount} at the public price)" not in bob.body  # formatted, not raw
    assert "(CN¥1.20 at the public price)" in bob.body


def test_the_admins_summary_shows_the_idle_capacity():
    # seed_rate: 3000 CNY over 3M tokens of quota; 8,000 tokens used, the rest is idle (no payer: unallocated)
    period, _ = finalized_month(actual_cost=None, kind="seed_rate")
    assert period.idle > 0
    period_statements_send(period=period)
    summary = next(m for m in mail.outbox if "are out" in m.subject)
    assert "Idle capacity: CN¥2,992.00 (99.73% of the month)" in summary.body
    assert "Unallocated: CN¥2,992.00" in summary.body
