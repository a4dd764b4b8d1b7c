"""The member's forms: only the fields a member may set (a key's label and expiry; list filters)."""
from datetime import datetime, timedelta

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


class UsageFilterForm(forms.Form):
    """Filters of the request list and its CSV export; days are the team's, both included."""

    since = forms.DateField(label=_("From"), required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(label=_("To"), required=False, widget=forms.DateInput(attrs={"type": "date"}))
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
            return parsed, int(pk)
        except ValueError:
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
