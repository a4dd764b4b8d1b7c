"""Usage rows: one per /v1 request, written by the gateway (append-only)."""
from django.db import models
from django.utils.translation import gettext_lazy as _


class UsageRecord(models.Model):
    """One row per /v1 request, written once by the gateway (append-only)."""

    class Status(models.TextChoices):
        OK = "ok", _("Ok")
        CLIENT_DISCONNECTED = "client_disconnected", _("Client Disconnected")
        # The upstream refused the request itself (a 4xx from vLLM: bad parameters, too long):
        # the client's mistake, told apart from the server's failures below. Costs nothing.
        CLIENT_ERROR = "client_error", _("Client Error")
        UPSTREAM_ERROR = "upstream_error", _("Upstream Error")
        UPSTREAM_UNAVAILABLE = "upstream_unavailable", _("Upstream Unavailable")
        UPSTREAM_TIMEOUT = "upstream_timeout", _("Upstream Timeout")
        REJECTED = "rejected", _("Rejected")

    request_id = models.CharField(max_length=64, unique=True)
    team = models.ForeignKey("tenants.Team", on_delete=models.PROTECT, related_name="+")
    member = models.ForeignKey("tenants.Member", on_delete=models.PROTECT, related_name="usage_records")
    api_key = models.ForeignKey("tenants.ApiKey", on_delete=models.PROTECT, null=True, related_name="+")
    period_start = models.DateField()
    endpoint = models.CharField(max_length=32)
    model = models.CharField(max_length=200)
    upstream = models.CharField(max_length=64, blank=True)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    total_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    status = models.CharField(max_length=24, choices=Status.choices)
    http_status = models.PositiveSmallIntegerField()
    stream = models.BooleanField(default=False)
    started_at = models.DateTimeField()
    ttft_ms = models.FloatField(null=True, blank=True)
    duration_ms = models.FloatField()

    class Meta:
        indexes = [
            # Dashboards and invoicing aggregate a team's or a member's month.
            models.Index(fields=["team", "period_start"], name="usage_team_period"),
            models.Index(fields=["member", "period_start"], name="usage_member_period"),
            # Time-range listings (a member's recent requests).
            models.Index(fields=["member", "-started_at"], name="usage_member_started"),
        ]

    def __str__(self) -> str:
        return self.request_id
