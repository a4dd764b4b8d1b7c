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
