"""The team admin's forms: only the fields an admin may set here (never a member's role, user or team)."""
import re
from datetime import date

from django import forms
from django.utils.translation import gettext_lazy as _

REASON_HELP = _("Shown to the member in the history of their account.")
MONTH = re.compile(r"^(\d{4})-(\d{2})$")
# Months QwenHub can hold and shift between time zones without leaving datetime's range (as the API's days).
FIRST_YEAR, LAST_YEAR = 2000, 2999


def _reason_field():
    return forms.CharField(label=_("Reason"), max_length=500, help_text=REASON_HELP,
                           widget=forms.TextInput(attrs={"size": 40}))


# A monthly quota's ceiling, as the API's: the open month's limit is quota + top-ups in a bigint column.
QUOTA_MAX = 2**62


def _limit(label, *, min_value=0, max_value=QUOTA_MAX):
    return forms.IntegerField(label=label, required=False, min_value=min_value, max_value=max_value,
                              help_text=_("Empty: unlimited."))


class MemberLimitsForm(forms.Form):
    """A member's monthly quotas, rate limits and fair-share weight (tenants.services.member_update)."""

    FIELDS = ("request_quota", "token_quota", "requests_per_minute", "tokens_per_minute",
              "max_concurrent_requests", "weight")

    request_quota = _limit(_("Requests per month"))
    token_quota = _limit(_("Tokens per month"))
    requests_per_minute = _limit(_("Requests per minute"), max_value=2**31 - 1)
    tokens_per_minute = _limit(_("Tokens per minute"), max_value=2**31 - 1)
    max_concurrent_requests = _limit(_("Concurrent requests"), max_value=2**31 - 1)
    weight = forms.IntegerField(label=_("Weight"), min_value=1, max_value=32767,
                                help_text=_("Share of the GPU when it is busy, against the other members' weights."))
    reason = _reason_field()

    @classmethod
    def for_member(cls, member, data=None):
        return cls(data, initial={name: getattr(member, name) for name in cls.FIELDS})

    def changes(self) -> dict:
        return {name: self.cleaned_data[name] for name in self.FIELDS}


class ReasonForm(forms.Form):
    """Suspend, reactivate, revoke a key: the reason the member will read."""

    reason = _reason_field()


class ActualCostForm(forms.Form):
    """The month's real cost (billing.services.period_set_actual_cost checks the currency's minor unit)."""

    amount = forms.DecimalField(label=_("Actual cost"), min_value=0, max_digits=14, decimal_places=4)
    reason = forms.CharField(label=_("Reason"), max_length=500,
                             help_text=_("Recorded in the audit trail, e.g. the provider's invoice number."))


class MonthForm(forms.Form):
    """A month as YYYY-MM (closing a month that has no period row yet)."""

    month = forms.CharField(label=_("Month"), max_length=7)

    def clean_month(self) -> date:
        match = MONTH.match(self.cleaned_data["month"].strip())
        if not match or not 1 <= int(match.group(2)) <= 12 or not FIRST_YEAR <= int(match.group(1)) <= LAST_YEAR:
            raise forms.ValidationError(_("Enter a month as YYYY-MM, e.g. 2026-11."))
        return date(int(match.group(1)), int(match.group(2)), 1)
