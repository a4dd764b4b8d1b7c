"""A team's billing policy, its months (periods), and the invoices a closed month is split into."""
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from billing import policies
from qwenhub.models import TimestampedModel


MODEL_WEIGHTS_INVALID = ('Model weights must be an object of model name → non-negative number, '
                         'e.g. {"qwen2.5-72b": "3"}.')
PUBLIC_PRICES_INVALID = ('Public prices must be an object of model name → {"prompt": price, "completion": price} '
                         'per 1M tokens, non-negative numbers, e.g. {"qwen2.5-7b-instruct": {"prompt": "0.3", '
                         '"completion": "0.6"}}.')


def _non_negative_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, str, float)):
        return False
    try:
        number = Decimal(str(value))
    except ArithmeticError:
        return False
    return number.is_finite() and number >= 0


def validate_model_weights(value) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and _non_negative_number(v) for k, v in value.items()):
        raise ValidationError(MODEL_WEIGHTS_INVALID)


def validate_public_prices(value) -> None:
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, dict) and set(v) <= {"prompt", "completion"} and v
        and all(_non_negative_number(p) for p in v.values()) for k, v in value.items())
    if not ok:
        raise ValidationError(PUBLIC_PRICES_INVALID)


# Money amounts: 3 decimal places cover every currency's minor unit (JPY 0, CNY 2, KWD 3);
# services store amounts already rounded to the period's currency (billing.money.quantize).
AMOUNT = {"max_digits": 16, "decimal_places": 3}
WEIGHT = {"max_digits": 12, "decimal_places": 6}


class BillingPolicy(TimestampedModel):
    """How a team's monthly cost is split (billing.policies); one per team, created with the defaults.

    WARNING: editing a policy changes the next close's invoices only: a closed period keeps
    the snapshot it was split with (BillingPeriod.policy).
    """

    class Kind(models.TextChoices):
        USAGE = policies.USAGE
        QUOTA = policies.QUOTA
        SEED_RATE = policies.SEED_RATE
        EQUAL = policies.EQUAL
        BASE_PLUS_USAGE = policies.BASE_PLUS_USAGE

    class QuotaUnit(models.TextChoices):
        TOKENS = "tokens"
        REQUESTS = "requests"

    team = models.OneToOneField("tenants.Team", on_delete=models.PROTECT, related_name="billing_policy")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.USAGE)
    prompt_weight = models.DecimalField(**WEIGHT, default=Decimal(1), validators=[MinValueValidator(0)])
    completion_weight = models.DecimalField(**WEIGHT, default=Decimal(1), validators=[MinValueValidator(0)])
    # {"model name": "weight"} (decimal strings); a model left out weighs 1.
    model_weights = models.JSONField(default=dict, blank=True, validators=[validate_model_weights])
    # base_plus_usage: the part of the cost split equally (0..1).
    base_share = models.DecimalField(max_digits=7, decimal_places=6, default=Decimal("0.5"),
                                     validators=[MinValueValidator(0), MaxValueValidator(1)])
    quota_unit = models.CharField(max_length=16, choices=QuotaUnit.choices, default=QuotaUnit.TOKENS)
    # seed_rate: who pays the capacity nobody used (null: it stays unallocated).
    idle_payer = models.ForeignKey("tenants.Member", on_delete=models.PROTECT, null=True, blank=True,
                                   related_name="+")
    # Review window: days after the close before invoices are issued automatically.
    grace_days = models.PositiveSmallIntegerField(default=0)
    # Optional public API list prices per 1M tokens, for the "what it would have cost" view:
    # {"model name": {"prompt": "0.30", "completion": "0.60"}} in the team's currency.
    public_prices = models.JSONField(default=dict, blank=True, validators=[validate_public_prices])

    class Meta:
        verbose_name_plural = "billing policies"
        constraints = [
            models.CheckConstraint(condition=Q(kind__in=list(policies.POLICIES)), name="policy_kind_known"),
            models.CheckConstraint(condition=Q(quota_unit__in=["tokens", "requests"]), name="policy_quota_unit_known"),
            models.CheckConstraint(condition=Q(prompt_weight__gte=0, completion_weight__gte=0),
                                   name="policy_weights_nonneg"),
            models.CheckConstraint(condition=Q(base_share__gte=0, base_share__lte=1), name="policy_base_share_0_1"),
        ]

    def __str__(self) -> str:
        return f"{self.team} {self.kind}"


class BillingPeriod(TimestampedModel):
    """A team's calendar month (tenants.periods): open → closed (drafts) → finalized (issued).

    The status moves only by conditional UPDATE (WHERE status = the expected one), so two
    closes or finalizes racing each other cannot both act.
    """

    class Status(models.TextChoices):
        OPEN = "open", _("Open")
        CLOSED = "closed", _("Closed")
        FINALIZED = "finalized", _("Finalized")

    team = models.ForeignKey("tenants.Team", on_delete=models.PROTECT, related_name="billing_periods")
    start = models.DateField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    currency = models.CharField(max_length=3)
    # The team's monthly_cost when the period was closed, and the real bill an admin entered.
    planned_cost = models.DecimalField(**AMOUNT, null=True, blank=True)
    actual_cost = models.DecimalField(**AMOUNT, null=True, blank=True)
    # What was split (actual or planned, rounded to the currency), how, and what it gave.
    cost = models.DecimalField(**AMOUNT, null=True, blank=True)
    policy = models.JSONField(default=dict, blank=True)  # snapshot: billing.selectors.policy_params_to_json
    applied_policy = models.CharField(max_length=16, blank=True)  # "equal" after a fallback
    explanation = models.TextField(blank=True)  # in English, as closed
    # billing.policies.Explanation.to_json(): the same sentence, said in each reader's language
    explanation_parts = models.JSONField(default=dict, blank=True)
    allocated = models.DecimalField(**AMOUNT, default=0)
    idle = models.DecimalField(**AMOUNT, default=0)
    unallocated = models.DecimalField(**AMOUNT, default=0)
    fell_back = models.BooleanField(default=False)
    # [{"member_id", "counter_id", "requests", "tokens"}]: reservations still held when the
    # close's wait ran out, given back by the close.
    released_reservations = models.JSONField(default=list, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    finalized_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["team", "start"], name="uniq_period_team_start"),
            models.CheckConstraint(condition=Q(start__day=1), name="period_starts_on_the_1st"),
            models.CheckConstraint(condition=Q(status__in=["open", "closed", "finalized"]), name="period_status_known"),
            models.CheckConstraint(
                condition=Q(status="open") | Q(closed_at__isnull=False, planned_cost__isnull=False,
                                               cost__isnull=False),
                name="period_closed_has_cost"),
            models.CheckConstraint(condition=~Q(status="finalized") | Q(finalized_at__isnull=False),
                                   name="period_finalized_has_time"),
            models.CheckConstraint(
                condition=(Q(planned_cost__isnull=True) | Q(planned_cost__gte=0))
                & (Q(actual_cost__isnull=True) | Q(actual_cost__gte=0)) & (Q(cost__isnull=True) | Q(cost__gte=0))
                & Q(allocated__gte=0, idle__gte=0, unallocated__gte=0),
                name="period_amounts_nonneg"),
        ]
        indexes = [
            # The scheduled close and finalize look for periods by status, oldest month first.
            models.Index(fields=["status", "start"], name="period_status_start"),
        ]

    def __str__(self) -> str:
        return f"{self.team} {self.start:%Y-%m} ({self.status})"

    @property
    def explanation_text(self) -> str:
        """How the cost was split, in the active language (as stored, for a period closed before that was kept)."""
        explained = policies.Explanation.from_json(self.explanation_parts)
        return explained.translated() if explained else self.explanation

    @property
    def policy_name(self) -> str:
        return policies.policy_name(self.applied_policy)


class Invoice(TimestampedModel):
    """One member's part of a period: drafts at close, numbered and issued at finalize (then append-only).

    `allocated` is the member's part of the split; `amount` adds adjustment lines (corrections
    of earlier, finalized months). The inputs of the split (active days, the period's quotas)
    are kept so a recompute after a cost correction uses exactly what the close saw.
    """

    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="invoices")
    team = models.ForeignKey("tenants.Team", on_delete=models.PROTECT, related_name="+")
    member = models.ForeignKey("tenants.Member", on_delete=models.PROTECT, related_name="invoices")
    allocated = models.DecimalField(**AMOUNT)
    amount = models.DecimalField(**AMOUNT)
    # allocated ÷ the period's cost, for display only (never fed back into arithmetic).
    share = models.DecimalField(max_digits=9, decimal_places=8, default=0)
    active_days = models.PositiveSmallIntegerField()
    request_quota = models.BigIntegerField(null=True, blank=True)
    token_quota = models.BigIntegerField(null=True, blank=True)
    # Numbered at finalize, per team without gaps: LAB-2026-11-007 is the team's 7th invoice.
    sequence = models.PositiveIntegerField(null=True, blank=True)
    number = models.CharField(max_length=48, null=True, blank=True)
    issued_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["period", "member"], name="uniq_invoice_period_member"),
            models.UniqueConstraint(fields=["team", "sequence"], name="uniq_invoice_team_sequence"),
            models.UniqueConstraint(fields=["team", "number"], name="uniq_invoice_team_number"),
            models.CheckConstraint(
                condition=Q(sequence__isnull=True, number__isnull=True, issued_at__isnull=True)
                | Q(sequence__isnull=False, number__isnull=False, issued_at__isnull=False),
                name="invoice_numbered_when_issued"),
            models.CheckConstraint(condition=Q(sequence__isnull=True) | Q(sequence__gte=1),
                                   name="invoice_sequence_pos"),
            models.CheckConstraint(condition=Q(allocated__gte=0, share__gte=0, share__lte=1),
                                   name="invoice_allocated_nonneg"),
        ]
        indexes = [
            # A member's invoices, newest period first (their billing page and statements).
            models.Index(fields=["member", "-period"], name="invoice_member_period"),
        ]

    def __str__(self) -> str:
        return self.number or f"draft {self.member_id} {self.period_id}"


class InvoiceAdjustment(models.Model):
    """A correction of a finalized invoice, billed as a line on a later (not yet finalized) month.

    Append-only; the line is written when the target period closes (or at once if it is closed).
    """

    team = models.ForeignKey("tenants.Team", on_delete=models.PROTECT, related_name="+")
    member = models.ForeignKey("tenants.Member", on_delete=models.PROTECT, related_name="+")
    corrects = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="corrections")
    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="adjustments")
    amount = models.DecimalField(**AMOUNT)  # positive: the member owes more; negative: a credit
    reason = models.CharField(max_length=500)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True,
                              related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~Q(amount=0), name="adjustment_nonzero"),
            models.CheckConstraint(condition=~Q(reason=""), name="adjustment_has_reason"),
        ]
        indexes = [
            # The close collects the adjustments billed in its period.
            models.Index(fields=["period", "member"], name="adjustment_period_member"),
        ]

    def __str__(self) -> str:
        return f"{self.amount} for {self.member_id}: {self.reason}"


class InvoiceLine(models.Model):
    """One part of an invoice: a model's usage, the fixed or idle part, or an adjustment."""

    class Kind(models.TextChoices):
        USAGE = "usage", _("Usage")  # one per model used: its tokens and its part of the member's amount
        BASE = "base", _("Base")  # the part of a member without usage (fixed parts: equal, base_plus_usage)
        IDLE = "idle", _("Idle")  # seed_rate: the idle capacity charged to the team's payer
        ADJUSTMENT = "adjustment", _("Adjustment")  # a correction of an earlier month, with its reason

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="lines")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    model = models.CharField(max_length=200, blank=True)
    requests = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    model_weight = models.DecimalField(**WEIGHT, default=Decimal(1))
    weighted_tokens = models.DecimalField(max_digits=30, decimal_places=6, default=0)
    amount = models.DecimalField(**AMOUNT)
    # What the same tokens would cost at the team's public API price (null: no price set).
    public_price_amount = models.DecimalField(**AMOUNT, null=True, blank=True)
    adjustment = models.OneToOneField(InvoiceAdjustment, on_delete=models.PROTECT, null=True, blank=True,
                                      related_name="line")
    reason = models.CharField(max_length=500, blank=True)

    class Meta:
        constraints = [
            # Adjustments are told apart by their adjustment row, every other line by (kind, model).
            models.UniqueConstraint(fields=["invoice", "model", "kind"], condition=~Q(kind="adjustment"),
                                    name="uniq_line_invoice_model_kind"),
            models.CheckConstraint(condition=Q(kind__in=["usage", "base", "idle", "adjustment"]),
                                   name="line_kind_known"),
            models.CheckConstraint(
                condition=(Q(kind="adjustment") & Q(adjustment__isnull=False) & ~Q(reason=""))
                | (~Q(kind="adjustment") & Q(adjustment__isnull=True)),
                name="line_adjustment_has_reason"),
            models.CheckConstraint(condition=Q(requests__gte=0, prompt_tokens__gte=0, completion_tokens__gte=0),
                                   name="line_usage_nonneg"),
            models.CheckConstraint(condition=Q(kind="adjustment") | Q(amount__gte=0), name="line_amount_nonneg"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.model} {self.amount}"
