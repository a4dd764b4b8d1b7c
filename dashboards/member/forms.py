"""The member's forms: only the fields a member may set (a key's label and expiry; list filters)."""
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone

from django import forms
from django.utils.translation import gettext_lazy as _

from billing.models import UsageRecord

MAX_EXPIRY_DAYS = 3650
PAGE_SIZE = 50
CHART_MONTHS = (1, 3, 6, 12)


class ApiKeyCreateForm(forms.Form):
    label = forms.CharField(label=_("Label"), max_length=100, required=False,
                            help_text=_("Where you use it, e.g. “laptop”."))
    expires_days = forms.IntegerField(label=_("Expires after (days)"), required=False, min_value=1,
                                      max_value=MAX_EXPIRY_DAYS, help_text=_("Empty: never expires."))


# Days QwenHub can hold and shift between time zones (9999-12-31 has no next day): as the API's.
FIRST_DAY, LAST_DAY = date(2000, 1, 1), date(2999, 12, 31)


class DayField(forms.DateField):
    widget = forms.DateInput(attrs={"type": "date"})

    def validate(self, value):
        super().validate(value)
        if value and not FIRST_DAY <= value <= LAST_DAY:
            raise forms.ValidationError(_("A day from %(first)s to %(last)s.") % {"first": FIRST_DAY, "last": LAST_DAY})


class UsageFilterForm(forms.Form):
    """Filters of the request list and its CSV export; days are the team's, both included."""

    since = DayField(label=_("From"), required=False)
    until = DayField(label=_("To"), required=False)
    model = forms.CharField(label=_("Model"), max_length=200, required=False)
    status = forms.ChoiceField(label=_("Status"), required=False,
                               choices=[("", _("any"))] + list(UsageRecord.Status.choices))
    # Keyset pagination: the (started_at, id) of the last row shown, "2026-11-03T10:00:00+00:00_123".
    after = forms.CharField(required=False, widget=forms.HiddenInput, max_length=80)

    def clean_after(self):
        value = self.cleaned_data["after"]
        if not value:
            return None
        when, _sep, pk = value.rpartition("_")
        try:
            parsed = datetime.fromisoformat(when)
            if parsed.tzinfo is None:
                raise ValueError(when)
            parsed = parsed.astimezone(dt_timezone.utc)  # PostgreSQL takes offsets up to ±15:59 only
            if not FIRST_DAY <= parsed.date() <= LAST_DAY:
                raise ValueError(when)
            return parsed, int(pk)
        except (ValueError, OverflowError):
            raise forms.ValidationError(_("This page link is not valid: start from the first page.")) from None

    def clean(self):
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        if since and until and since > until:
            self.add_error("until", _("The end date must not be before the start date."))
        return data

    def usage_filters(self) -> dict:
        """The keyword arguments of billing.reports.usage_rows (until exclusive there)."""
        data = self.cleaned_data
        until = data.get("until")
        return {"since": data.get("since"), "until": until + timedelta(days=1) if until else None,
                "model": data.get("model") or None, "status": data.get("status") or None}
