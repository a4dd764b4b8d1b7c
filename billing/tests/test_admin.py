"""Admin for usage rows: read-only."""
import pytest
from django.urls import reverse

from billing.models import UsageRecord
from tenants.tests.factories import UsageRecordFactory

pytestmark = pytest.mark.django_db


def test_usage_records_cannot_be_added_changed_or_deleted(admin_client):
    row = UsageRecordFactory(total_tokens=150)
    assert admin_client.get(reverse("admin:billing_usagerecord_add")).status_code == 403
    change_url = reverse("admin:billing_usagerecord_change", args=[row.pk])
    response = admin_client.get(change_url)
    assert response.status_code == 200 and 'name="_save"' not in response.content.decode()
    assert admin_client.post(change_url, {"total_tokens": "1"}).status_code == 403
    assert admin_client.post(reverse("admin:billing_usagerecord_delete", args=[row.pk]),
                             {"post": "yes"}).status_code == 403
    response = admin_client.get(reverse("admin:billing_usagerecord_changelist"))
    assert "delete_selected" not in response.content.decode()
    assert UsageRecord.objects.get(pk=row.pk).total_tokens == 150


# --- policies, periods, invoices ---------------------------------------------------------
import zoneinfo  # noqa: E402
from datetime import date, datetime  # noqa: E402
from decimal import Decimal  # noqa: E402

from django.contrib.admin.models import CHANGE, LogEntry  # noqa: E402

from billing.models import BillingPeriod, BillingPolicy, Invoice, InvoiceAdjustment  # noqa: E402
from billing.services import period_close, period_finalize  # noqa: E402
from billing.tests.factories import MemberJoinedFactory, usage  # noqa: E402
from tenants.models import AuditEvent  # noqa: E402
from tenants.tests.factories import TeamFactory  # noqa: E402

NOV = date(2026, 11, 1)
AFTER_NOV = datetime(2026, 12, 1, 1, tzinfo=zoneinfo.ZoneInfo("Asia/Shanghai"))


def _closed_period():
    team = TeamFactory(slug="lab", monthly_cost="100.00")
    a, b = MemberJoinedFactory(team=team), MemberJoinedFactory(team=team)
    usage(a, NOV, prompt=300, completion=0)
    usage(b, NOV, prompt=100, completion=0)
    return period_close(team=team, start=NOV, now=AFTER_NOV, wait_seconds=0)


def _policy_post(team, **overrides):
    data = {"team": team.pk, "kind": "usage", "prompt_weight": "1", "completion_weight": "1", "model_weights": "{}",
            "base_share": "0.5", "quota_unit": "tokens", "idle_payer": "", "grace_days": "0", "public_prices": "{}"}
    return {**data, **overrides}


def test_policy_is_edited_through_the_service_with_an_audit_event(admin_client, admin_user):
    team = TeamFactory()
    response = admin_client.post(reverse("admin:billing_billingpolicy_add"),
                                 _policy_post(team, kind="equal", grace_days="3"))
    assert response.status_code == 302
    policy = BillingPolicy.objects.get(team=team)
    assert (policy.kind, policy.grace_days) == ("equal", 3)
    change_url = reverse("admin:billing_billingpolicy_change", args=[policy.pk])
    response = admin_client.post(change_url, _policy_post(team, kind="seed_rate", quota_unit="requests",
                                                          model_weights='{"big": "2"}'))
    assert response.status_code == 302
    policy.refresh_from_db()
    assert (policy.kind, policy.quota_unit, policy.model_weights) == ("seed_rate", "requests", {"big": "2"})
    event = AuditEvent.objects.filter(data__action="billing.policy_updated").latest("pk")
    assert event.actor == admin_user and event.data["after"]["kind"] == "seed_rate"


def test_policy_admin_refuses_bad_json_and_a_payer_of_another_team(admin_client):
    team, other = TeamFactory(), TeamFactory()
    stranger = MemberJoinedFactory(team=other)
    response = admin_client.post(reverse("admin:billing_billingpolicy_add"),
                                 _policy_post(team, model_weights='{"big": -1}', idle_payer=stranger.pk))
    assert response.status_code == 200
    body = response.content.decode()
    assert "Model weights must be" in body and "must be a member of" in body
    assert not BillingPolicy.objects.exists()


def test_periods_and_invoices_are_read_only(admin_client):
    period = _closed_period()
    invoice = period.invoices.first()
    for name, obj in (("billingperiod", period), ("invoice", invoice)):
        assert admin_client.get(reverse(f"admin:billing_{name}_add")).status_code == 403
        change_url = reverse(f"admin:billing_{name}_change", args=[obj.pk])
        response = admin_client.get(change_url)
        assert response.status_code == 200 and 'name="_save"' not in response.content.decode()
        assert admin_client.post(change_url, {"status": "finalized", "amount": "1"}).status_code == 403
    page = admin_client.get(reverse("admin:billing_invoice_change", args=[invoice.pk])).content.decode()
    assert "qwen2.5-7b-instruct" in page  # the lines inline
    period.refresh_from_db()
    assert period.status == "closed"


def test_actual_cost_and_finalize_actions_call_the_services(admin_client, admin_user):
    period = _closed_period()
    changelist = reverse("admin:billing_billingperiod_changelist")
    selection = {"_selected_action": [period.pk]}
    response = admin_client.post(changelist, {**selection, "action": "set_actual_cost"})
    assert response.status_code == 200 and "admin/action_form.html" in [t.name for t in response.templates]
    response = admin_client.post(changelist, {**selection, "action": "set_actual_cost", "apply": "1",
                                              "amount": "80.00", "reason": "real bill"})
    assert response.status_code == 302
    period.refresh_from_db()
    assert period.actual_cost == Decimal("80.00")
    assert sorted(period.invoices.values_list("amount", flat=True)) == [Decimal("20.00"), Decimal("60.00")]
    response = admin_client.post(changelist, {**selection, "action": "finalize"})
    assert response.status_code == 302
    period.refresh_from_db()
    assert period.status == "finalized"
    assert LogEntry.objects.filter(object_id=str(period.pk), action_flag=CHANGE).count() == 2


def test_finalizing_an_open_period_in_the_admin_is_refused_with_a_message(admin_client):
    team = TeamFactory(slug="lab")
    period = BillingPeriod.objects.create(team=team, start=NOV, currency="CNY")
    response = admin_client.post(reverse("admin:billing_billingperiod_changelist"),
                                 {"_selected_action": [period.pk], "action": "finalize"}, follow=True)
    assert "still open" in response.content.decode()
    period.refresh_from_db()
    assert period.status == "open"


def test_adjust_action_on_a_finalized_invoice(admin_client):
    period = period_finalize(period=_closed_period())
    invoice = period.invoices.order_by("member_id").first()
    response = admin_client.post(reverse("admin:billing_invoice_changelist"), {
        "_selected_action": [invoice.pk], "action": "adjust", "apply": "1", "amount": "-2.00",
        "reason": "double-counted job"})
    assert response.status_code == 302
    adjustment = InvoiceAdjustment.objects.get()
    assert (adjustment.corrects, adjustment.amount, adjustment.period.start) == (invoice, Decimal("-2.00"),
                                                                              date(2026, 12, 1))
    assert Invoice.objects.get(pk=invoice.pk).amount == invoice.amount


def test_usage_durations_read_as_rounded_milliseconds(admin_client):
    UsageRecordFactory(duration_ms=82.97194999977364, ttft_ms=1234.4)
    page = admin_client.get(reverse("admin:billing_usagerecord_changelist")).content.decode()
    assert "83 ms" in page and "1,234 ms" in page
    assert "82.97194999977364" not in page
