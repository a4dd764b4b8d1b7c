"""The invitation form: only what a team admin may set for a new member (no mass assignment).

Whether the username or e-mail is taken is the service's check (member_invite); the view
shows its errors on these fields.
"""
from django import forms
from django.contrib.auth.validators import UnicodeUsernameValidator
from django.utils.translation import gettext_lazy as _

from dashboards.team.forms import QUOTA_MAX
from tenants.models import Member


class InviteForm(forms.Form):
    email = forms.EmailField(label=_("E-mail address"))
    username = forms.CharField(label=_("Username"), max_length=150, validators=[UnicodeUsernameValidator()],
                               help_text=_("Letters, digits and @/./+/-/_ only."))
    role = forms.ChoiceField(label=_("Role"), choices=Member.Role.choices, initial=Member.Role.MEMBER)
    request_quota = forms.IntegerField(label=_("Monthly request quota"), min_value=0, max_value=QUOTA_MAX,
                                       required=False, help_text=_("Leave empty for no limit."))
    token_quota = forms.IntegerField(label=_("Monthly token quota"), min_value=0, max_value=QUOTA_MAX,
                                     required=False, help_text=_("Leave empty for no limit."))
    reason = forms.CharField(label=_("Note for the audit trail"), max_length=200, required=False)
