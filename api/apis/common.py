"""Serializers and helpers shared by the member's and the team admin's endpoints."""
import zoneinfo
from datetime import date, timedelta

from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from rest_framework import serializers

from billing.models import BillingPeriod, InvoiceLine, UsageRecord
from billing.selectors import invoice_detail

MAX_RANGE_DAYS = 366
FIELD_NOT_ALLOWED = _("This field cannot be set here.")
RANGE_INVALID = _("`until` must be after `since`.")
RANGE_TOO_LONG = _("At most %(days)d days at a time.") % {"days": MAX_RANGE_DAYS}


FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2999, 12, 1)
DAY_OUT_OF_RANGE = _("A day from %(first)s to %(last)s.") % {"first": FIRST_DAY, "last": LAST_DAY}


class DayField(serializers.DateField):
    """A calendar day QwenHub can hold (and shift between time zones without overflowing)."""

    def to_internal_value(self, value):
        day = super().to_internal_value(value)
        if not FIRST_DAY <= day <= LAST_DAY:
            raise serializers.ValidationError(DAY_OUT_OF_RANGE)
        return day


class StrictInputSerializer(serializers.Serializer):
    """Input that refuses fields it does not declare (a role's forbidden fields are a 400, never ignored)."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: [FIELD_NOT_ALLOWED] for name in unknown})
        return super().to_internal_value(data)


class ReasonInputSerializer(StrictInputSerializer):
    reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="",
                                   help_text="Why (kept in the audit trail).")


class DateRangeSerializer(serializers.Serializer):
    """[since, until) in the team's calendar days."""

    since = DayField(required=False, help_text="First day (team's time zone), inclusive.")
    until = DayField(required=False, help_text="Day after the last (team's time zone), exclusive.")

    default_days = 30

    def validate(self, attrs):
        team = self.context["team"]
        today = timezone.now().astimezone(zoneinfo.ZoneInfo(team.timezone)).date()
        until = attrs.get("until") or (attrs["since"] + timedelta(days=self.default_days) if attrs.get("since")
                                       else today + timedelta(days=1))
        since = attrs.get("since") or until - timedelta(days=self.default_days)
        if until <= since:
            raise serializers.ValidationError({"until": [RANGE_INVALID]})
        if (until - since).days > MAX_RANGE_DAYS:
            raise serializers.ValidationError({"since": [RANGE_TOO_LONG]})
        return {**attrs, "since": since, "until": until}


class UsageFilterSerializer(serializers.Serializer):
    since = DayField(required=False, help_text="First day (team's time zone), inclusive.")
    until = DayField(required=False, help_text="Day after the last (team's time zone), exclusive.")
    model = serializers.CharField(required=False, max_length=200, help_text="Only this public model.")
    status = serializers.ChoiceField(choices=UsageRecord.Status.choices, required=False,
                                     help_text="Only requests that ended so.")

    def validate(self, attrs):
        if attrs.get("since") and attrs.get("until") and attrs["until"] <= attrs["since"]:
            raise serializers.ValidationError({"until": [RANGE_INVALID]})
        return attrs


class UsageRowSerializer(serializers.Serializer):
    """One request (never its prompt or answer: QwenHub stores none)."""

    id = serializers.IntegerField()
    request_id = serializers.CharField()
    member_id = serializers.IntegerField()
    api_key_id = serializers.IntegerField(allow_null=True)
    endpoint = serializers.CharField()
    model = serializers.CharField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()
    status = serializers.ChoiceField(choices=UsageRecord.Status.choices)
    http_status = serializers.IntegerField()
    stream = serializers.BooleanField()
    started_at = serializers.DateTimeField()
    ttft_ms = serializers.FloatField(allow_null=True)
    duration_ms = serializers.FloatField()


class DayUsageSerializer(serializers.Serializer):
    day = serializers.DateField()
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    tokens = serializers.IntegerField()


class MoneySerializer(serializers.DecimalField):
    """An exact amount as a string, as stored ("2999.500"): never a float."""

    def __init__(self, **kwargs):
        kwargs.setdefault("max_digits", 16)  # as stored (billing.models AMOUNT)
        kwargs.setdefault("decimal_places", 3)
        kwargs.setdefault("coerce_to_string", True)
        super().__init__(**kwargs)


class InvoiceSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    number = serializers.CharField(allow_null=True, help_text="Set when issued (finalized); null on a draft.")
    month = serializers.SerializerMethodField()
    period_status = serializers.ChoiceField(source="period.status", choices=BillingPeriod.Status.choices)
    member_id = serializers.IntegerField()
    currency = serializers.CharField(source="period.currency")
    allocated = MoneySerializer()
    amount = MoneySerializer(help_text="allocated plus adjustment lines.")
    share = serializers.DecimalField(max_digits=9, decimal_places=8, coerce_to_string=True)
    active_days = serializers.IntegerField()
    issued_at = serializers.DateTimeField(allow_null=True)

    def get_month(self, invoice) -> str:
        return f"{invoice.period.start:%Y-%m}"


class InvoiceLineSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=InvoiceLine.Kind.choices)
    model = serializers.CharField()
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    amount = MoneySerializer()
    public_price_amount = MoneySerializer(allow_null=True)
    reason = serializers.CharField()


class InvoiceDetailSerializer(InvoiceSerializer):
    lines = InvoiceLineSerializer(many=True)
    tokens = serializers.IntegerField()
    effective_price = serializers.DecimalField(max_digits=30, decimal_places=6, coerce_to_string=True,
                                               allow_null=True, help_text="Amount per 1M tokens.")
    public_price_amount = MoneySerializer(allow_null=True)


def invoice_detail_data(invoice) -> dict:
    detail = invoice_detail(invoice=invoice)
    data = InvoiceSerializer(detail.invoice).data
    return {**data, "lines": InvoiceLineSerializer(detail.lines, many=True).data, "tokens": detail.tokens,
            "effective_price": None if detail.effective_price is None else str(detail.effective_price),
            "public_price_amount": None if detail.public_price_amount is None
            else str(detail.public_price_amount)}
