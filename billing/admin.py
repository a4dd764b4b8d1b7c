"""Admin for usage rows (read-only: written by the gateway, billed), billing policies, periods and invoices."""
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from billing.models import BillingPeriod, BillingPolicy, Invoice, InvoiceLine, StatementEmail, UsageRecord
from billing.services import (
    IDLE_PAYER_OTHER_TEAM, billing_policy_update, invoice_adjust, period_finalize, period_set_actual_cost,
    statement_email_resend,
)
from billing.services.policies import POLICY_FIELDS
from qwenhub.admin import ReadOnlyAdminMixin, SecretLookupsRefusedMixin, action_form_response, each_through_service


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdminMixin, SecretLookupsRefusedMixin, admin.ModelAdmin):
    """One row per /v1 request, written by the gateway and billed: never added, edited or deleted here."""

    list_display = ["started_at", "team", "member", "model", "endpoint", "status", "http_status", "prompt_tokens",
                    "completion_tokens", "total_tokens", "duration", "time_to_first_token", "request_id"]
    list_filter = ["status", "period_start", "team", "model"]
    search_fields = ["=request_id", "member__user__username"]
    list_select_related = ["team", "member__user", "member__team", "api_key"]
    date_hierarchy = "started_at"
    show_full_result_count = False  # COUNT(*) over all usage on every page is not free
    # The raw floats (82.97194999977364) stay in the model; people read milliseconds, rounded.
    readonly_fields = ["duration", "time_to_first_token"]

    @admin.display(description="duration", ordering="duration_ms")
    def duration(self, row):
        return _milliseconds(row.duration_ms)

    @admin.display(description="time to first token", ordering="ttft_ms")
    def time_to_first_token(self, row):
        return _milliseconds(row.ttft_ms)


def _milliseconds(value: float | None) -> str:
    """82.97194999977364 → "83 ms"; 1234.4 → "1,234 ms" (display only)."""
    return "—" if value is None else f"{value:,.0f} ms"


# --- policies, periods, invoices ---------------------------------------------------------
# Periods and invoices are never edited here: they change only through the billing
# services (close, actual cost, finalize, adjust), offered as actions, each an audit event.



class BillingPolicyForm(forms.ModelForm):
    class Meta:
        model = BillingPolicy
        fields = ["team", "kind", "prompt_weight", "completion_weight", "model_weights", "base_share", "quota_unit",
                  "idle_payer", "grace_days", "public_prices"]

    def clean(self):
        data = super().clean()
        team = data.get("team") or getattr(self.instance, "team", None)
        payer = data.get("idle_payer")
        if payer is not None and team is not None and payer.team_id != team.pk:
            self.add_error("idle_payer", IDLE_PAYER_OTHER_TEAM.format(team=team))
        return data


@admin.register(BillingPolicy)
class BillingPolicyAdmin(admin.ModelAdmin):
    """How each team's cost is split; a change applies from the next close (closed months keep theirs)."""

    form = BillingPolicyForm
    list_display = ["team", "kind", "prompt_weight", "completion_weight", "base_share", "quota_unit", "idle_payer",
                    "grace_days", "updated_at"]
    list_select_related = ["team", "idle_payer__user", "idle_payer__team"]
    list_filter = ["kind"]
    search_fields = ["team__slug", "team__name"]
    autocomplete_fields = ["idle_payer"]

    def get_readonly_fields(self, request, obj=None):
        return ["team"] if obj else []

    def has_delete_permission(self, request, obj=None):
        return False  # a team without a row is on the defaults; change the kind instead

    def save_model(self, request, obj, form, change):
        """Through billing_policy_update (validation, the audit event), never a bare save()."""
        team = obj.team
        changes = {name: form.cleaned_data[name] for name in form.changed_data if name in POLICY_FIELDS}
        policy = billing_policy_update(team=team, actor=request.user, reason="changed in the admin", **changes)
        obj.pk = policy.pk


class InvoiceInline(admin.TabularInline):
    model = Invoice
    fields = ["number", "member", "allocated", "amount", "share_percent", "active_days", "issued_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("member__user", "member__team").order_by("member_id")

    @admin.display(description="share %")
    def share_percent(self, invoice):
        return _percent(invoice.share)


def _percent(share) -> str:
    return f"{share * 100:.2f}"  # display only


class ActualCostForm(forms.Form):
    amount = forms.DecimalField(min_value=0, decimal_places=3, max_digits=16,
                                help_text="The month's real cost (the GPU or cloud bill), in the team's currency.")
    reason = forms.CharField(max_length=500, help_text="Why, for the audit trail.")


class AdjustmentForm(forms.Form):
    amount = forms.DecimalField(decimal_places=3, max_digits=16,
                                help_text="Positive: the member owes more; negative: a credit.")
    reason = forms.CharField(max_length=500, help_text="Printed on the invoice that carries the adjustment.")


class _ServiceActionMixin:
    def _form_action(self, request, queryset, *, form_class, action, title, intro, apply):
        """Ask for the form, then call `apply(obj, data)` once per selected row; a refusal is a message."""
        objects = list(queryset.order_by("pk"))
        form = form_class(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            done = 0
            for obj in objects:
                try:
                    apply(obj, form.cleaned_data)
                except ValidationError as exc:
                    self.message_user(request, f"{obj}: {' '.join(exc.messages)}", messages.ERROR)
                    continue
                self.log_change(request, obj, f"{title}: {form.cleaned_data['reason']}")
                done += 1
            if done:
                self.message_user(request, f"{title}: done for {done} row(s).", messages.SUCCESS)
            return None
        return action_form_response(self, request, title=title, intro=intro, objects=objects, form=form,
                                    selected=[o.pk for o in objects], action=action)


@admin.register(BillingPeriod)
class BillingPeriodAdmin(_ServiceActionMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    """Months of each team: closed by the scheduler or close_period; cost entered and finalized here."""

    list_display = ["team", "start", "status", "currency", "planned_cost", "actual_cost", "cost", "allocated", "idle",
                    "unallocated", "fell_back", "closed_at", "finalized_at"]
    list_filter = ["status", "team"]
    list_select_related = ["team"]
    date_hierarchy = "start"
    inlines = [InvoiceInline]
    actions = ["set_actual_cost", "finalize"]

    def has_billing_permission(self, request):
        return request.user.has_perm("billing.change_billingperiod")

    @admin.action(description="Enter the actual cost… (recomputes the drafts)", permissions=["billing"])
    def set_actual_cost(self, request, queryset):
        return self._form_action(
            request, queryset.select_related("team"), form_class=ActualCostForm, action="set_actual_cost",
            title="Enter the actual cost",
            intro="The drafts of these closed months are recomputed with this cost (policy as at the close):",
            apply=lambda period, data: period_set_actual_cost(period=period, amount=data["amount"],
                                                              actor=request.user, reason=data["reason"]))

    @admin.action(description="Finalize (number and issue the invoices)", permissions=["billing"])
    def finalize(self, request, queryset):
        each_through_service(self, request, queryset.select_related("team").order_by("start", "pk"),
                             lambda period: period_finalize(period=period, actor=request.user),
                             logged="Finalized: invoices numbered and issued.", done="Finalized {n} period(s).")


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    fields = ["kind", "model", "requests", "prompt_tokens", "completion_tokens", "model_weight", "weighted_tokens",
              "amount", "public_price_amount", "reason"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Invoice)
class InvoiceAdmin(_ServiceActionMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    """Invoices: drafts change only by a recompute of their month, issued ones never (adjust a later month)."""

    list_display = ["__str__", "period", "member", "allocated", "amount", "share_percent", "issued_at"]
    list_filter = ["period__status", "team"]
    search_fields = ["=number", "member__user__username"]
    list_select_related = ["period__team", "member__user", "member__team"]
    inlines = [InvoiceLineInline]
    actions = ["adjust"]

    def has_billing_permission(self, request):
        return request.user.has_perm("billing.change_invoice")

    @admin.display(description="share %")
    def share_percent(self, invoice):
        return _percent(invoice.share)

    @admin.action(description="Correct on a later month…", permissions=["billing"])
    def adjust(self, request, queryset):
        return self._form_action(
            request, queryset.select_related("period__team", "team", "member__user", "member__team"),
            form_class=AdjustmentForm, action="adjust", title="Correct on a later month",
            intro="An adjustment line with this amount and reason goes on each member's next unfinalized month:",
            apply=lambda invoice, data: invoice_adjust(invoice=invoice, amount=data["amount"], reason=data["reason"],
                                                       actor=request.user))


class ResendForm(forms.Form):
    reason = forms.CharField(max_length=500, help_text="Why it is sent again, for the audit trail.")


@admin.register(StatementEmail)
class StatementEmailAdmin(_ServiceActionMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    """The statements' outbox: written by the sends only; an interrupted one waits here for a deliberate resend."""

    list_display = ["__str__", "kind", "team", "period", "invoice", "status", "attempts", "sent_at", "last_error"]
    list_filter = ["status", "kind", "team"]
    search_fields = ["=message_id", "=invoice__number"]
    list_select_related = ["team", "period__team", "invoice"]
    readonly_fields = ["kind", "team", "period", "invoice", "message_id", "status", "attempts", "recipients",
                       "sending_since", "sent_at", "last_error", "created_at", "updated_at"]
    actions = ["resend"]

    def has_billing_permission(self, request):
        return request.user.has_perm("billing.change_statementemail")

    @admin.action(description="Resend… (sent or needs attention; same Message-ID)", permissions=["billing"])
    def resend(self, request, queryset):
        return self._form_action(
            request, queryset.select_related("period__team", "invoice"), form_class=ResendForm, action="resend",
            title="Resend the statement",
            intro="These e-mails are sent again to their recipients as they are now (audited):",
            apply=lambda email, data: statement_email_resend(email=email, actor=request.user,
                                                             reason=data["reason"]))
