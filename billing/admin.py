"""Admin for usage rows: read-only (written by the gateway, billed)."""
from django.contrib import admin

from billing.models import UsageRecord
from qwenhub.admin import ReadOnlyAdminMixin
from tenants.admin import SecretLookupsRefusedMixin


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdminMixin, SecretLookupsRefusedMixin, admin.ModelAdmin):
    """One row per /v1 request, written by the gateway and billed: never added, edited or deleted here."""

    list_display = ["started_at", "team", "member", "model", "endpoint", "status", "http_status", "prompt_tokens",
                    "completion_tokens", "total_tokens", "duration_ms", "request_id"]
    list_filter = ["status", "period_start", "team", "model"]
    search_fields = ["=request_id", "member__user__username"]
    list_select_related = ["team", "member__user", "member__team", "api_key"]
    date_hierarchy = "started_at"
    show_full_result_count = False  # COUNT(*) over all usage on every page is not free
