"""Usage rows and the per-member, per-month quota counters.

Billing periods, invoices and statements come next and will live here too.
"""
from django.db import models
from django.db.models import F, Q


class QuotaCounter(models.Model):
    """A member's quota for one billing period (the team's calendar month).

    The gateway moves it with conditional UPDATEs only (reserve, then settle):
    the database is the truth, so concurrent requests cannot overspend it.
    A new month is a new row, so nothing is zeroed at midnight.
    """

    member = models.ForeignKey("tenants.Member", on_delete=models.PROTECT, related_name="quota_counters")
    period_start = models.DateField()
    # Limits for this period, copied from the member when the row is opened and
    # moved by top-ups; null = unlimited.
    request_limit = models.BigIntegerField(null=True, blank=True)
    token_limit = models.BigIntegerField(null=True, blank=True)
    requests_used = models.BigIntegerField(default=0)
    requests_reserved = models.BigIntegerField(default=0)
    tokens_used = models.BigIntegerField(default=0)
    tokens_reserved = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["member", "period_start"], name="uniq_quota_member_period"),
            models.CheckConstraint(condition=Q(requests_reserved__gte=0), name="quota_req_reserved_nonneg"),
            models.CheckConstraint(condition=Q(tokens_reserved__gte=0), name="quota_tok_reserved_nonneg"),
            models.CheckConstraint(
                condition=Q(request_limit__isnull=True) | Q(request_limit__gte=F("requests_used")),
                name="quota_requests_within_limit",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.member_id} {self.period_start:%Y-%m}"


class TeamQuotaCounter(models.Model):
    """A team-wide monthly token cap (Team.token_cap), moved like QuotaCounter."""

    team = models.ForeignKey("tenants.Team", on_delete=models.PROTECT, related_name="quota_counters")
    period_start = models.DateField()
    token_limit = models.BigIntegerField(null=True, blank=True)
    tokens_used = models.BigIntegerField(default=0)
    tokens_reserved = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "period_start"], name="uniq_teamquota_team_period"),
            models.CheckConstraint(condition=Q(tokens_reserved__gte=0), name="teamquota_tok_reserved_nonneg"),
        ]

    def __str__(self) -> str:
        return f"{self.team_id} {self.period_start:%Y-%m}"


class UsageRecord(models.Model):
    """One row per /v1 request, written once by the gateway (append-only)."""

    class Status(models.TextChoices):
        OK = "ok"
        CLIENT_DISCONNECTED = "client_disconnected"
        UPSTREAM_ERROR = "upstream_error"
        UPSTREAM_UNAVAILABLE = "upstream_unavailable"
        UPSTREAM_TIMEOUT = "upstream_timeout"
        REJECTED = "rejected"

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
