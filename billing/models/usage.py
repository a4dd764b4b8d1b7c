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
            # Dashboards and invoicing aggregate a team's or a member's month, and the days of it
            # not rolled up yet (billing.services.rollups).
            models.Index(fields=["team", "period_start", "started_at"], name="usage_team_period_started"),
            models.Index(fields=["member", "period_start"], name="usage_member_period"),
            # Time-range listings (a member's recent requests).
            models.Index(fields=["member", "-started_at"], name="usage_member_started"),
        ]

    def __str__(self) -> str:
        return self.request_id


class UsageDay(models.Model):
    """The counted usage (billing.selectors.BILLED_STATUSES) of one member × model × day of the team.

    A rollup of the usage rows, written by billing.services.rollups for days over for longer than
    the longest request, so a chart of a busy month reads days, not a million rows. The rows stay
    what invoices are made of; the rollups only answer billing.reports.usage_by_day.
    """

    team = models.ForeignKey("tenants.Team", on_delete=models.CASCADE, related_name="+")
    member = models.ForeignKey("tenants.Member", on_delete=models.CASCADE, related_name="+")
    model = models.CharField(max_length=200)
    day = models.DateField()  # in the team's time zone (UsageDayRollup.timezone)
    period_start = models.DateField()  # the month the rows were admitted in (a request at midnight: the next one)
    requests = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "day", "member", "model", "period_start"], name="uniq_usage_day"),
        ]
        indexes = [models.Index(fields=["member", "day"], name="usage_day_member")]

    def __str__(self) -> str:
        return f"{self.member_id} {self.model} {self.day}"


class UsageDayRollup(models.Model):
    """How far a team's days are rolled up: every day before `until`, as days of `timezone`.

    A team whose time zone changed since reads its rows until the days are rolled up again.
    """

    team = models.OneToOneField("tenants.Team", on_delete=models.CASCADE, primary_key=True, related_name="+")
    timezone = models.CharField(max_length=64)
    until = models.DateField()
    updated_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.team_id} until {self.until}"
