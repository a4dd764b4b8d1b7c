"""Admin for quota counters and usage rows: read-only; quotas move only through billing services."""
from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.template.response import TemplateResponse

from billing.models import QuotaCounter, TeamQuotaCounter, UsageRecord
from billing.services import quota_reset, quota_top_up
from qwenhub.admin import ReadOnlyAdminMixin
from tenants.admin import SecretLookupsRefusedMixin
from tenants.models import Member

QUOTA_FORM_TEMPLATE = "admin/billing/quotacounter/quota_action.html"


class QuotaTopUpForm(forms.Form):
    requests = forms.IntegerField(min_value=0, initial=0, required=False, help_text="Requests to add.")
    tokens = forms.IntegerField(min_value=0, initial=0, required=False, help_text="Tokens to add.")
    reason = forms.CharField(max_length=500, help_text="Why, for the audit trail.")

    def clean(self):
        data = super().clean()
        if not (data.get("requests") or data.get("tokens")):
            raise forms.ValidationError("Add a positive number of requests or tokens.")
        return data


class QuotaResetForm(forms.Form):
    reason = forms.CharField(max_length=500, help_text="Why, for the audit trail.")


@admin.register(QuotaCounter)
class QuotaCounterAdmin(ReadOnlyAdminMixin, SecretLookupsRefusedMixin, admin.ModelAdmin):
    """Counters are moved by the gateway; here they are viewed, topped up or reset (this month only)."""

    list_display = ["member", "team", "period_start", "requests_used", "requests_reserved", "request_limit",
                    "tokens_used", "tokens_reserved", "token_limit"]
    list_filter = ["period_start", "member__team"]
    search_fields = ["member__user__username", "member__team__slug"]
    list_select_related = ["member__user", "member__team"]
    actions = ["top_up", "reset"]

    def has_quota_permission(self, request):
        return request.user.has_perm("billing.change_quotacounter")

    @admin.display(description="team", ordering="member__team__slug")
    def team(self, counter):
        return counter.member.team

    @admin.action(description="Top up… (this month)", permissions=["quota"])
    def top_up(self, request, queryset):
        def apply(member, data):
            return quota_top_up(member=member, requests=data["requests"] or 0, tokens=data["tokens"] or 0,
                                actor=request.user, reason=data["reason"])

        def describe(data):
            return f"Topped up by {data['requests'] or 0} requests and {data['tokens'] or 0} tokens: {data['reason']}"

        return self._quota_action(request, queryset, QuotaTopUpForm, "top_up", "Top up this month's quota",
                                  apply, describe)

    @admin.action(description="Reset for this month…", permissions=["quota"])
    def reset(self, request, queryset):
        def apply(member, data):
            return quota_reset(member=member, actor=request.user, reason=data["reason"])

        def describe(data):
            return f"Reset for this month: {data['reason']}"

        return self._quota_action(request, queryset, QuotaResetForm, "reset", "Reset this month's quota",
                                  apply, describe)

    def _quota_action(self, request, queryset, form_class, action, title, apply, describe):
        """Ask for the amount and reason, then call the service once per selected member."""
        member_ids = queryset.values_list("member_id", flat=True).distinct()
        members = list(Member.objects.select_related("user", "team").filter(pk__in=member_ids).order_by("pk"))
        form = form_class(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            done = 0
            for member in members:
                try:
                    counter = apply(member, form.cleaned_data)
                except ValueError as exc:
                    self.message_user(request, str(exc), messages.ERROR)
                    continue
                self.log_change(request, counter, describe(form.cleaned_data))
                done += 1
            if done:
                self.message_user(request, f"{title}: done for {done} member(s).", messages.SUCCESS)
            return None  # back to the change list
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "form": form,
            "members": members,
            "selected": queryset.values_list("pk", flat=True),
            "action": action,
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, QUOTA_FORM_TEMPLATE, context)


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdminMixin, SecretLookupsRefusedMixin, admin.ModelAdmin):
    """One row per /v1 request, written by the gateway and billed: never added, edited or deleted here."""

    list_display = ["started_at", "team", "member", "model", "endpoint", "status", "http_status", "prompt_tokens",
                    "completion_tokens", "total_tokens", "duration_ms", "request_id"]
    list_filter = ["status", "period_start", "team", "model"]
    search_fields = ["=request_id", "member__user__username"]
    list_select_related = ["team", "member__user", "member__team", "api_key"]
    date_hierarchy = "started_at"
    show_full_result_count = False  # COUNT(*) over all usage on every page is not free


@admin.register(TeamQuotaCounter)
class TeamQuotaCounterAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """A team's monthly token cap as the gateway moves it: read-only."""

    list_display = ["team", "period_start", "tokens_used", "tokens_reserved", "token_limit"]
    list_select_related = ["team"]
    list_filter = ["period_start"]
