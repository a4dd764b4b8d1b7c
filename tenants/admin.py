"""Admin for teams, members, API keys, quota counters and the audit trail.

Every write goes through a service (the same ones commands and the API call), every list
through a selector. Key hashes are never shown, searched or filterable (only the display prefix is);
revocation goes through api_key_revoke and is recorded in the admin history. Quota
counters are read-only: the gateway moves them, admins top them up or reset them
through the quota services (this month only).
"""
from django import forms
from django.contrib import admin, messages

from qwenhub.admin import (
    ReadOnlyAdminMixin, SecretLookupsRefusedMixin, ServiceAdminMixin, action_form_response, adopt,
    each_through_service, form_data, inline_changes,
)
from tenants.models import ApiKey, AuditEvent, Member, QuotaCounter, Team, TeamQuotaCounter
from tenants.selectors import api_key_list, member_list, member_list_for_counters, team_list
from tenants.services import (
    api_key_revoke,
    api_key_update,
    member_create,
    member_update,
    quota_reset,
    quota_top_up,
    team_create,
    team_update,
)
from tenants.services.keys import API_KEY_UPDATE_FIELDS
from tenants.services.teams import MEMBER_UPDATE_FIELDS, TEAM_UPDATE_FIELDS

QUOTA_HELP = (
    "Per month; empty = unlimited. A change applies to this month at once (top-ups granted this "
    "month are kept); to give a fresh allowance, use Quota counters → “Reset for this month”."
)


class MemberInlineForm(forms.ModelForm):
    class Meta:
        model = Member
        fields = ["role", "request_quota", "token_quota", "requests_per_minute", "tokens_per_minute",
                  "max_concurrent_requests", "weight", "is_active"]
        help_texts = {"request_quota": QUOTA_HELP, "token_quota": QUOTA_HELP}


class MemberInline(admin.TabularInline):
    """Quotas and limits of the team's members, editable in place (add members with add_member or Members)."""

    model = Member
    form = MemberInlineForm
    fields = ["user", "role", "request_quota", "token_quota", "requests_per_minute", "tokens_per_minute",
              "max_concurrent_requests", "weight", "is_active"]
    readonly_fields = ["user"]
    extra = 0
    show_change_link = True
    can_delete = False  # members with usage are protected; deactivate instead

    def has_add_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        return member_list()


@admin.register(Team)
class TeamAdmin(ServiceAdminMixin, SecretLookupsRefusedMixin, admin.ModelAdmin):
    """Saved through team_create / team_update (the members inline in the same transaction)."""

    list_display = ["slug", "name", "monthly_cost", "currency", "timezone", "token_cap", "member_count", "created_at"]
    search_fields = ["slug", "name"]
    list_filter = ["currency"]
    list_select_related = True  # no foreign keys; stated so every changelist says it
    inlines = [MemberInline]
    readonly_fields = ["created_at", "updated_at"]

    def get_queryset(self, request):
        return team_list()

    def has_delete_permission(self, request, obj=None):
        return False  # members, usage and the audit trail point at teams

    def save_with_services(self, request, form, formsets, change):
        members = []
        for formset in formsets:  # members are only changed here (never added or deleted)
            _added, changed, _deleted = inline_changes(formset, form.instance, MEMBER_UPDATE_FIELDS)
            members += changed
        if not change:
            data = form.cleaned_data
            team = team_create(slug=data["slug"], name=data["name"], timezone_name=data["timezone"],
                               currency=data["currency"], monthly_cost=data["monthly_cost"],
                               token_cap=data.get("token_cap"), actor=request.user)
            adopt(form.instance, team)
            return
        team_update(team=form.instance, data=form_data(form, TEAM_UPDATE_FIELDS), members=members,
                    actor=request.user)

    @admin.display(description="members", ordering="member_count")
    def member_count(self, team):
        return team.member_count


@admin.register(Member)
class MemberAdmin(ServiceAdminMixin, SecretLookupsRefusedMixin, admin.ModelAdmin):
    """Saved through member_create / member_update (a changed quota reaches this month in the same step)."""

    list_display = ["user", "team", "role", "request_quota", "token_quota", "requests_per_minute",
                    "max_concurrent_requests", "is_active"]
    list_filter = ["team", "role", "is_active"]
    search_fields = ["user__username", "user__email", "team__slug"]
    list_select_related = ["user", "team"]
    raw_id_fields = ["user"]
    filter_horizontal = ["allowed_models"]
    readonly_fields = ["created_at", "updated_at"]
    fieldsets = [
        (None, {"fields": ["user", "team", "role", "is_active"]}),
        ("Monthly quotas (empty = unlimited)", {"fields": ["request_quota", "token_quota"], "description": QUOTA_HELP}),
        ("Rate limits (empty = unlimited)", {"fields": ["requests_per_minute", "tokens_per_minute",
                                                        "max_concurrent_requests", "weight"]}),
        ("Models (none selected = every model)", {"fields": ["allowed_models"]}),
        (None, {"fields": ["created_at", "updated_at"]}),
    ]

    def has_delete_permission(self, request, obj=None):
        return False  # usage and the audit trail point at members; deactivate instead

    def get_readonly_fields(self, request, obj=None):
        # Moving a member (and their usage history) to another user or team is not an edit.
        return [*self.readonly_fields, "user", "team"] if obj else self.readonly_fields

    def save_with_services(self, request, form, formsets, change):
        data = form_data(form, MEMBER_UPDATE_FIELDS)
        if change:
            member = member_update(member=form.instance, data=data, actor=request.user)
        else:
            member = member_create(team=form.cleaned_data["team"], user=form.cleaned_data["user"], **data,
                                   actor=request.user)
        adopt(form.instance, member)


class KeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("active", "active"), ("revoked", "revoked")]

    def queryset(self, request, queryset):
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


@admin.register(ApiKey)
class ApiKeyAdmin(ServiceAdminMixin, SecretLookupsRefusedMixin, admin.ModelAdmin):
    """Keys are issued with create_key or the dashboard (the raw key is shown once), never here."""

    list_display = ["prefix", "label", "member", "team", "created_at", "last_used_at", "expires_at", "revoked_at"]
    list_filter = [KeyStatusFilter, "member__team"]
    # Never key_hash: an admin must not be able to test a guessed key against the table.
    search_fields = ["^prefix", "label", "member__user__username"]
    list_select_related = ["member__user", "member__team"]
    fields = ["prefix", "label", "member", "created_at", "last_used_at", "expires_at", "revoked_at"]
    readonly_fields = ["prefix", "member", "created_at", "last_used_at", "expires_at", "revoked_at"]
    actions = ["revoke_selected"]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # usage rows point at keys; revoke instead

    def get_queryset(self, request):
        return api_key_list()

    def save_with_services(self, request, form, formsets, change):
        adopt(form.instance, api_key_update(key=form.instance, data=form_data(form, API_KEY_UPDATE_FIELDS),
                                            actor=request.user))

    @admin.display(description="team", ordering="member__team__slug")
    def team(self, key):
        return key.member.team

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request, queryset):
        each_through_service(self, request, api_key_list(ids=queryset.values("pk")).order_by("pk"),
                             lambda key: api_key_revoke(key=key, actor=request.user, reason="revoked in the admin"),
                             logged="Revoked (admin action “Revoke selected keys”).",
                             done="Revoked {n} key(s); gateways refuse them within seconds.",
                             refused_level=messages.WARNING)


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdminMixin, SecretLookupsRefusedMixin, admin.ModelAdmin):
    """The audit trail is append-only: viewable, never edited here."""

    list_display = ["created_at", "kind", "team", "member", "actor", "subject_id", "reason"]
    list_filter = ["kind", "team"]
    search_fields = ["reason", "member__user__username", "actor__username"]
    list_select_related = ["team", "member__user", "member__team", "actor"]
    date_hierarchy = "created_at"


QUOTA_ACTION_INTRO = ("This changes the current month's quota counter of these members (the team's calendar "
                      "month), whichever month the selected rows belong to:")


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
        return request.user.has_perm("tenants.change_quotacounter")

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
        members = member_list_for_counters(counters=queryset)
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
        return action_form_response(self, request, title=title, intro=QUOTA_ACTION_INTRO, objects=members, form=form,
                                    selected=queryset.values_list("pk", flat=True), action=action)


@admin.register(TeamQuotaCounter)
class TeamQuotaCounterAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """A team's monthly token cap as the gateway moves it: read-only."""

    list_display = ["team", "period_start", "tokens_used", "tokens_reserved", "token_limit"]
    list_select_related = ["team"]
    list_filter = ["period_start"]
