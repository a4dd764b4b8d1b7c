"""Teams, their members, members' API keys, their monthly quota counters, and the audit trail."""
import zoneinfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import F, Q
from django.utils.translation import gettext_lazy as _

from qwenhub.models import TimestampedModel

CURRENCY_INVALID = "Currency must be a three-letter ISO 4217 code such as CNY, USD or EUR."
TIMEZONE_INVALID = "Unknown time zone {value!r}: use an IANA name such as Asia/Shanghai."

currency_validator = RegexValidator(r"^[A-Z]{3}$", CURRENCY_INVALID)


def validate_timezone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(TIMEZONE_INVALID.format(value=value))


class Team(TimestampedModel):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    currency = models.CharField(max_length=3, default="CNY", validators=[currency_validator])
    monthly_cost = models.DecimalField(
        max_digits=14, decimal_places=2, default=0, validators=[MinValueValidator(0)]
    )
    # Team-wide monthly token cap on top of the members' own quotas (null = none).
    token_cap = models.BigIntegerField(null=True, blank=True, validators=[MinValueValidator(0)])

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(monthly_cost__gte=0), name="team_cost_nonneg"),
            models.CheckConstraint(condition=Q(currency__regex=r"^[A-Z]{3}$"), name="team_currency_iso"),
        ]

    def __str__(self) -> str:
        return self.slug


class Member(TimestampedModel):
    class Role(models.TextChoices):
        MEMBER = "member", _("Member")
        ADMIN = "admin", _("Admin")

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="members")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    # Monthly quotas; null means unlimited.
    request_quota = models.BigIntegerField(null=True, blank=True, validators=[MinValueValidator(0)])
    token_quota = models.BigIntegerField(null=True, blank=True, validators=[MinValueValidator(0)])
    # Rate limits; null means unlimited.
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    max_concurrent_requests = models.PositiveIntegerField(null=True, blank=True)
    # Share of a saturated upstream relative to other members (fair queueing).
    weight = models.PositiveSmallIntegerField(default=1, validators=[MinValueValidator(1)])
    # Models this member may call; empty means every model.
    allowed_models = models.ManyToManyField("proxy.PublicModel", blank=True, related_name="+")
    is_active = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "user"], name="uniq_member_team_user"),
            models.CheckConstraint(condition=Q(request_quota__gte=0), name="member_request_quota_nonneg"),
            models.CheckConstraint(condition=Q(token_quota__gte=0), name="member_token_quota_nonneg"),
            models.CheckConstraint(condition=Q(weight__gte=1), name="member_weight_pos"),
        ]

    def __str__(self) -> str:
        return f"{self.user.get_username()}@{self.team.slug}"


class ApiKey(TimestampedModel):
    member = models.ForeignKey(Member, on_delete=models.CASCADE, related_name="api_keys")
    label = models.CharField(max_length=100, blank=True)
    # Shown in lists so people can tell keys apart; never enough to use the key.
    prefix = models.CharField(max_length=16, db_index=True)
    # "sha256$<hex>" of the full key; the key itself is never stored.
    key_hash = models.CharField(max_length=80, unique=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.label or 'no label'})"


class QuotaCounter(models.Model):
    """A member's quota for one billing period (the team's calendar month).

    The gateway moves it with conditional UPDATEs only (reserve, then settle):
    the database is the truth, so concurrent requests cannot overspend it.
    A new month is a new row, so nothing is zeroed at midnight.
    """

    member = models.ForeignKey("Member", on_delete=models.PROTECT, related_name="quota_counters")
    period_start = models.DateField()
    # Limits for this period, copied from the member when the row is opened and
    # moved by top-ups; null = unlimited.
    request_limit = models.BigIntegerField(null=True, blank=True)
    token_limit = models.BigIntegerField(null=True, blank=True)
    requests_used = models.BigIntegerField(default=0)
    requests_reserved = models.BigIntegerField(default=0)
    tokens_used = models.BigIntegerField(default=0)
    tokens_reserved = models.BigIntegerField(default=0)
    # What the sweep gave back this period: reservations whose request never settled
    # (its process died), with their tokens (tenants.services.reservations).
    reservations_swept = models.BigIntegerField(db_default=0)
    tokens_swept = models.BigIntegerField(db_default=0)

    class Meta:
        db_table = "billing_quotacounter"  # the table kept its name when the model moved here
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

    team = models.ForeignKey("Team", on_delete=models.PROTECT, related_name="quota_counters")
    period_start = models.DateField()
    token_limit = models.BigIntegerField(null=True, blank=True)
    tokens_used = models.BigIntegerField(default=0)
    tokens_reserved = models.BigIntegerField(default=0)

    class Meta:
        db_table = "billing_teamquotacounter"
        constraints = [
            models.UniqueConstraint(fields=["team", "period_start"], name="uniq_teamquota_team_period"),
            models.CheckConstraint(condition=Q(tokens_reserved__gte=0), name="teamquota_tok_reserved_nonneg"),
        ]

    def __str__(self) -> str:
        return f"{self.team_id} {self.period_start:%Y-%m}"


class QuotaReservation(models.Model):
    """One request's reservation, held on its counters until the request settles.

    The gateway writes it in the reservation's own statement and deletes it in the
    settlement's (tenants.quota), so the counters' reserved columns are the sum of these
    rows. A row older than the longest possible request belongs to a request whose
    process died: the sweep deletes it and gives its reservation back.
    """

    counter = models.ForeignKey(QuotaCounter, on_delete=models.CASCADE, related_name="reservations")
    team_counter = models.ForeignKey(TeamQuotaCounter, on_delete=models.CASCADE, null=True, blank=True,
                                     related_name="reservations")
    tokens = models.BigIntegerField()
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "tenants_quotareservation"  # tenants.quota.RESERVATION (checked by a test)

    def __str__(self) -> str:
        return f"{self.counter_id} {self.tokens} tokens since {self.created_at:%Y-%m-%d %H:%M:%S}"


class AuditEvent(models.Model):
    """An append-only record of a state change: who, when, what and why."""

    class Kind(models.TextChoices):
        TEAM_CREATED = "team_created", _("Team Created")
        TEAM_UPDATED = "team_updated", _("Team Updated")
        MEMBER_ADDED = "member_added", _("Member Added")
        MEMBER_UPDATED = "member_updated", _("Member Updated")
        MEMBER_INVITED = "member_invited", _("Member Invited")
        KEY_ISSUED = "key_issued", _("Key Issued")
        KEY_IMPORTED = "key_imported", _("Key Imported")
        KEY_REVOKED = "key_revoked", _("Key Revoked")
        KEY_UPDATED = "key_updated", _("Key Updated")
        QUOTA_TOPPED_UP = "quota_topped_up", _("Quota Topped Up")
        QUOTA_RESET = "quota_reset", _("Quota Reset")
        UPSTREAM_ADDED = "upstream_added", _("Upstream Added")
        UPSTREAM_UPDATED = "upstream_updated", _("Upstream Updated")
        UPSTREAM_DELETED = "upstream_deleted", _("Upstream Deleted")
        MODEL_ADDED = "model_added", _("Model Added")
        MODEL_UPDATED = "model_updated", _("Model Updated")
        MODEL_DELETED = "model_deleted", _("Model Deleted")
        ROUTE_ADDED = "route_added", _("Route Added")
        ROUTE_UPDATED = "route_updated", _("Route Updated")
        ROUTE_DELETED = "route_deleted", _("Route Deleted")
        ALIAS_ADDED = "alias_added", _("Alias Added")
        ALIAS_UPDATED = "alias_updated", _("Alias Updated")
        ALIAS_DELETED = "alias_deleted", _("Alias Deleted")
        # Billing's events (billing/services/audit.py); the kinds live here with the trail.
        PERIOD_CLOSED = "period_closed", _("Period Closed")
        RESERVATIONS_RELEASED = "reservations_released", _("Reservations Released")
        ACTUAL_COST_SET = "actual_cost_set", _("Actual Cost Set")
        PERIOD_FINALIZED = "period_finalized", _("Period Finalized")
        INVOICE_ADJUSTED = "invoice_adjusted", _("Invoice Adjusted")
        BILLING_POLICY_CREATED = "billing_policy_created", _("Billing Policy Created")
        BILLING_POLICY_UPDATED = "billing_policy_updated", _("Billing Policy Updated")
        STATEMENT_RESENT = "statement_resent", _("Statement Resent")

    team = models.ForeignKey(Team, on_delete=models.PROTECT, null=True, blank=True, related_name="audit_events")
    member = models.ForeignKey(Member, on_delete=models.PROTECT, null=True, blank=True, related_name="audit_events")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    subject_id = models.BigIntegerField(null=True, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            # The member's and the team's history pages list newest first.
            models.Index(fields=["member", "-created_at"], name="audit_member_created"),
            models.Index(fields=["team", "-created_at"], name="audit_team_created"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} at {self.created_at:%Y-%m-%d %H:%M}"
