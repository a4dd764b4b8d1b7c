"""A team admin's endpoints (/api/v1/teams/<slug>/...): members, usage, periods, invoices, audit trail, upstreams.

The caller must be an admin of the team in the URL: not a member of it → 404, a member
but not an admin → 403 (api.access.TeamAdminApi). Objects are looked up inside that team.
"""
from datetime import date

from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response

from api.access import TeamAdminApi, get_or_404
from api.apis.common import (
    FIRST_DAY, LAST_DAY, DateRangeSerializer, DayUsageSerializer, InvoiceDetailSerializer, InvoiceSerializer, MoneySerializer,
    ReasonInputSerializer, StrictInputSerializer, invoice_detail_data,
)
from api.errors import ADMIN_ERRORS
from api.pagination import AuditPagination
from api.selectors import team_invoices, team_period_get, team_periods, upstream_list
from billing.models import BillingPeriod
from proxy.health import health_latest
from billing.reports import usage_by_day
from billing.selectors import period_is_over
from billing.services import period_finalize, period_set_actual_cost
from billing.tasks import period_close_task, period_statements_send_task
from tenants.models import AuditEvent, Member
from tenants.selectors import member_list, member_quota_this_month, team_audit_events
from tenants.services import member_invite, member_invite_resend, member_update

TEAM = ["team"]
PERIOD_NOT_OVER = _("This month is not over yet in the team's time zone.")
NO_SUCH_PERIOD = _("This team has no billing period for that month.")
SUSPEND_SELF = _("You cannot suspend your own membership.")
ALREADY = _("The membership is already %(state)s.")
MONTH_OUT_OF_RANGE = _("A month from %(first)s to %(last)s, YYYY-MM.") % {"first": "2000-01", "last": "2999-12"}

SLUG = OpenApiParameter("slug", OpenApiTypes.STR, OpenApiParameter.PATH, description="The team's slug.")
MONTH = OpenApiParameter("month", OpenApiTypes.STR, OpenApiParameter.PATH, pattern=r"^\d{4}-(0[1-9]|1[0-2])$",
                         description="The period's month, YYYY-MM.")


# --- members ------------------------------------------------------------------------------

class TeamMemberSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    username = serializers.CharField(source="user.username")
    email = serializers.CharField(source="user.email")
    role = serializers.ChoiceField(choices=Member.Role.choices)
    is_active = serializers.BooleanField(help_text="false: suspended (its keys stop working).")
    request_quota = serializers.IntegerField(allow_null=True)
    token_quota = serializers.IntegerField(allow_null=True)
    requests_per_minute = serializers.IntegerField(allow_null=True)
    tokens_per_minute = serializers.IntegerField(allow_null=True)
    max_concurrent_requests = serializers.IntegerField(allow_null=True)
    weight = serializers.IntegerField()
    created_at = serializers.DateTimeField()


class MemberListApi(TeamAdminApi):
    OutputSerializer = TeamMemberSerializer

    @extend_schema(operation_id="team_members_list", tags=TEAM, parameters=[SLUG],
                   summary="The team's members (suspended ones included)",
                   responses={200: TeamMemberSerializer(many=True), **ADMIN_ERRORS})
    def get(self, request, slug: str):
        return Response(TeamMemberSerializer(member_list(team=request.team), many=True).data)


class MemberInviteApi(TeamAdminApi):
    class InputSerializer(StrictInputSerializer):
        email = serializers.EmailField(max_length=254, help_text="Where the set-password link is sent.")
        username = serializers.RegexField(r"^[\w.@+-]+\Z", max_length=150, help_text="Their sign-in name.")
        role = serializers.ChoiceField(choices=Member.Role.choices, default=Member.Role.MEMBER, required=False)
        request_quota = serializers.IntegerField(min_value=0, max_value=2**62, allow_null=True, required=False,
                                                 default=None, help_text="Monthly requests; null: unlimited.")
        token_quota = serializers.IntegerField(min_value=0, max_value=2**62, allow_null=True, required=False,
                                               default=None, help_text="Monthly tokens; null: unlimited.")
        reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="",
                                       help_text="Why (kept in the audit trail).")

    @extend_schema(operation_id="team_members_invite", tags=TEAM, parameters=[SLUG], request=InputSerializer,
                   summary="Invite a person by e-mail: the membership now, their password through the mailed link",
                   responses={201: TeamMemberSerializer, **ADMIN_ERRORS})
    def post(self, request, slug: str):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        member = member_invite(team=request.team, actor=request.user, **serializer.validated_data)
        return Response(TeamMemberSerializer(member).data, status=status.HTTP_201_CREATED)


class MemberDetailApi(TeamAdminApi):
    class OutputSerializer(TeamMemberSerializer):
        requests_used = serializers.IntegerField(help_text="This month.")
        tokens_used = serializers.IntegerField(help_text="This month.")
        request_limit = serializers.IntegerField(allow_null=True, help_text="This month's (quota + top-ups).")
        token_limit = serializers.IntegerField(allow_null=True, help_text="This month's (quota + top-ups).")

    @extend_schema(operation_id="team_members_retrieve", tags=TEAM, parameters=[SLUG],
                   summary="One member with this month's use", responses={200: OutputSerializer, **ADMIN_ERRORS})
    def get(self, request, slug: str, member_id: int):
        member = get_or_404(member_list(team=request.team), pk=member_id)
        quota = member_quota_this_month(member=member)
        for name in ("requests_used", "tokens_used", "request_limit", "token_limit"):
            setattr(member, name, getattr(quota, name))
        return Response(self.OutputSerializer(member).data)


class MemberUpdateApi(TeamAdminApi):
    class InputSerializer(StrictInputSerializer):
        request_quota = serializers.IntegerField(min_value=0, max_value=2**62, allow_null=True, required=False,
                                                 help_text="Monthly requests; null: unlimited.")
        token_quota = serializers.IntegerField(min_value=0, max_value=2**62, allow_null=True, required=False,
                                               help_text="Monthly tokens; null: unlimited.")
        requests_per_minute = serializers.IntegerField(min_value=1, max_value=2**31 - 1, allow_null=True,
                                                       required=False)
        tokens_per_minute = serializers.IntegerField(min_value=1, max_value=2**31 - 1, allow_null=True,
                                                     required=False)
        max_concurrent_requests = serializers.IntegerField(min_value=1, max_value=2**31 - 1, allow_null=True,
                                                           required=False)
        weight = serializers.IntegerField(min_value=1, max_value=32767, required=False,
                                          help_text="Share of a saturated upstream (fair queueing).")
        reason = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")

    OutputSerializer = TeamMemberSerializer

    @extend_schema(operation_id="team_members_update", tags=TEAM, parameters=[SLUG], request=InputSerializer,
                   summary="Change a member's quotas, rate limits or weight (only the fields sent)",
                   description="A changed monthly quota applies to the month already open. Any other field "
                               "(role, team, is_active, ...) is refused with a 400 naming it.",
                   responses={200: TeamMemberSerializer, **ADMIN_ERRORS})
    def post(self, request, slug: str, member_id: int):
        member = get_or_404(member_list(team=request.team), pk=member_id)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        reason = data.pop("reason")
        member = member_update(member=member, data=data, actor=request.user, reason=reason)
        return Response(TeamMemberSerializer(member).data)


def _set_active(request, member_id: int, active: bool, reason: str) -> Member:
    member = get_or_404(member_list(team=request.team), pk=member_id)
    if not active and member.pk == request.member.pk:
        raise exceptions.ValidationError({"non_field_errors": [SUSPEND_SELF]})
    if member.is_active == active:
        raise exceptions.ValidationError(
            {"non_field_errors": [ALREADY % {"state": _("active") if active else _("suspended")}]})
    return member_update(member=member, data={"is_active": active}, actor=request.user, reason=reason)


class MemberSuspendApi(TeamAdminApi):
    InputSerializer = ReasonInputSerializer
    OutputSerializer = TeamMemberSerializer

    @extend_schema(operation_id="team_members_suspend", tags=TEAM, parameters=[SLUG], request=ReasonInputSerializer,
                   summary="Suspend a member (their keys stop working within seconds)",
                   responses={200: TeamMemberSerializer, **ADMIN_ERRORS})
    def post(self, request, slug: str, member_id: int):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        member = _set_active(request, member_id, False, serializer.validated_data["reason"])
        return Response(TeamMemberSerializer(member).data)


class MemberInvitationApi(TeamAdminApi):
    InputSerializer = ReasonInputSerializer

    @extend_schema(operation_id="team_members_invitation_send", tags=TEAM, parameters=[SLUG],
                   request=ReasonInputSerializer, summary="E-mail an invited member a fresh set-password link",
                   description="For someone invited who has not set a password yet (the link expired, the "
                               "e-mail was lost); refused with a 400 once they have, or while suspended.",
                   responses={202: None, **ADMIN_ERRORS})
    def post(self, request, slug: str, member_id: int):
        member = get_or_404(member_list(team=request.team), pk=member_id)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        member_invite_resend(member=member, actor=request.user, reason=serializer.validated_data["reason"])
        return Response(status=status.HTTP_202_ACCEPTED)


class MemberReactivateApi(TeamAdminApi):
    InputSerializer = ReasonInputSerializer
    OutputSerializer = TeamMemberSerializer

    @extend_schema(operation_id="team_members_reactivate", tags=TEAM, parameters=[SLUG],
                   request=ReasonInputSerializer, summary="Reactivate a suspended member",
                   responses={200: TeamMemberSerializer, **ADMIN_ERRORS})
    def post(self, request, slug: str, member_id: int):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        member = _set_active(request, member_id, True, serializer.validated_data["reason"])
        return Response(TeamMemberSerializer(member).data)


# --- usage --------------------------------------------------------------------------------

class TeamUsageFilterSerializer(DateRangeSerializer):
    by = serializers.ChoiceField(choices=[("member", "member"), ("model", "model")], required=False,
                                 allow_null=True, default=None, help_text="One row per day and member, or model.")


class TeamUsageDailyApi(TeamAdminApi):
    FilterSerializer = TeamUsageFilterSerializer

    class OutputSerializer(DayUsageSerializer):
        member_id = serializers.IntegerField(allow_null=True, help_text="With by=member; else null.")
        username = serializers.CharField(allow_null=True, help_text="With by=member; else null.")
        model = serializers.CharField(allow_null=True, help_text="With by=model; else null.")

    @extend_schema(operation_id="team_usage_daily", tags=TEAM, parameters=[SLUG, TeamUsageFilterSerializer],
                   summary="The team's counted usage per day (and per member or model)",
                   description="Only answered requests (billing counts them); days are the team's calendar days; "
                               "default: the last 30 days.",
                   responses={200: OutputSerializer(many=True), **ADMIN_ERRORS})
    def get(self, request, slug: str):
        team = request.team
        filters = self.FilterSerializer(data=request.query_params, context={"team": team})
        filters.is_valid(raise_exception=True)
        f = filters.validated_data
        days = usage_by_day(team=team, since=f["since"], until=f["until"], by=f["by"])
        names = dict(member_list(team=team).values_list("pk", "user__username")) if f["by"] == "member" else {}
        data = [{"day": d.day, "member_id": d.key if f["by"] == "member" else None,
                 "username": names.get(d.key) if f["by"] == "member" else None,
                 "model": d.key if f["by"] == "model" else None, "requests": d.requests,
                 "prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens, "tokens": d.tokens}
                for d in days]
        return Response(self.OutputSerializer(data, many=True).data)


# --- periods ------------------------------------------------------------------------------

class PeriodSerializer(serializers.Serializer):
    month = serializers.SerializerMethodField()
    status = serializers.ChoiceField(choices=BillingPeriod.Status.choices)
    currency = serializers.CharField()
    planned_cost = MoneySerializer(allow_null=True, help_text="The team's monthly cost when closed.")
    actual_cost = MoneySerializer(allow_null=True, help_text="The real bill, once an admin entered it.")
    cost = MoneySerializer(allow_null=True, help_text="What was split (actual, else planned).")
    applied_policy = serializers.CharField()
    explanation = serializers.CharField()
    allocated = MoneySerializer()
    idle = MoneySerializer()
    unallocated = MoneySerializer()
    fell_back = serializers.BooleanField()
    closed_at = serializers.DateTimeField(allow_null=True)
    finalized_at = serializers.DateTimeField(allow_null=True)

    def get_month(self, period) -> str:
        return f"{period.start:%Y-%m}"


class PeriodListApi(TeamAdminApi):
    OutputSerializer = PeriodSerializer

    @extend_schema(operation_id="team_periods_list", tags=TEAM, parameters=[SLUG],
                   summary="The team's billing periods, newest first",
                   responses={200: PeriodSerializer(many=True), **ADMIN_ERRORS})
    def get(self, request, slug: str):
        return Response(PeriodSerializer(team_periods(team=request.team), many=True).data)


def _period_or_404(team, month: date) -> BillingPeriod:
    period = team_period_get(team=team, start=month)
    if period is None:
        raise exceptions.NotFound(NO_SUCH_PERIOD)
    return period


class PeriodCloseApi(TeamAdminApi):
    class OutputSerializer(serializers.Serializer):
        month = serializers.CharField()
        status = serializers.ChoiceField(choices=BillingPeriod.Status.choices,
                                         help_text="The period's status now (a queued close has not run yet).")
        queued = serializers.BooleanField(help_text="true: the close was queued; false: already closed.")

    @extend_schema(operation_id="team_periods_close", tags=TEAM, parameters=[SLUG, MONTH], request=None,
                   summary="Close a month that is over (queued; idempotent)",
                   description="Queues billing's close task (drafts invoices from the month's usage). "
                               "A month already closed or finalized is left as it is (200, queued=false).",
                   responses={202: OutputSerializer, 200: OutputSerializer, **ADMIN_ERRORS})
    def post(self, request, slug: str, month: date):
        team = request.team
        period = team_period_get(team=team, start=month)
        if period is not None and period.status != BillingPeriod.Status.OPEN:
            return Response({"month": f"{month:%Y-%m}", "status": period.status, "queued": False})
        if not period_is_over(team=team, start=month, now=timezone.now()):
            raise exceptions.ValidationError({"month": [PERIOD_NOT_OVER]})
        period_close_task.delay_on_commit(team.pk, month.isoformat())
        return Response({"month": f"{month:%Y-%m}", "status": BillingPeriod.Status.OPEN, "queued": True},
                        status=status.HTTP_202_ACCEPTED)


class PeriodFinalizeApi(TeamAdminApi):
    OutputSerializer = PeriodSerializer

    @extend_schema(operation_id="team_periods_finalize", tags=TEAM, parameters=[SLUG, MONTH], request=None,
                   summary="Issue a closed month's invoices (numbers them; idempotent), then send statements",
                   responses={200: PeriodSerializer, **ADMIN_ERRORS})
    def post(self, request, slug: str, month: date):
        period = _period_or_404(request.team, month)
        was = period.status
        period = period_finalize(period=period, actor=request.user)
        if was != BillingPeriod.Status.FINALIZED:
            period_statements_send_task.delay_on_commit(period.pk)
        return Response(PeriodSerializer(period).data)


class PeriodSetActualCostApi(TeamAdminApi):
    class InputSerializer(StrictInputSerializer):
        amount = serializers.DecimalField(max_digits=16, decimal_places=3, min_value=0,
                                          help_text="The month's real cost in the period's currency (its minor "
                                                    "unit), as a string: \"2999.50\".")
        reason = serializers.CharField(max_length=500, help_text="Why the cost changed (required).")

    OutputSerializer = PeriodSerializer

    @extend_schema(operation_id="team_periods_set_actual_cost", tags=TEAM, parameters=[SLUG, MONTH],
                   request=InputSerializer, summary="Enter a closed month's real cost (recomputes its drafts)",
                   responses={200: PeriodSerializer, **ADMIN_ERRORS})
    def post(self, request, slug: str, month: date):
        period = _period_or_404(request.team, month)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        period = period_set_actual_cost(period=period, amount=serializer.validated_data["amount"],
                                        actor=request.user, reason=serializer.validated_data["reason"])
        return Response(PeriodSerializer(period).data)


# --- invoices -----------------------------------------------------------------------------

class TeamInvoiceFilterSerializer(serializers.Serializer):
    month = serializers.RegexField(r"^\d{4}-(0[1-9]|1[0-2])$", required=False, help_text="Only this month, YYYY-MM.")

    def validate_month(self, value: str) -> str:
        try:
            start = date.fromisoformat(value + "-01")  # refuses year 0 and non-ASCII digits (\d matches them)
        except ValueError:
            start = None
        if start is None or not FIRST_DAY <= start <= LAST_DAY:
            raise serializers.ValidationError(MONTH_OUT_OF_RANGE)
        return value


class TeamInvoiceSerializer(InvoiceSerializer):
    username = serializers.CharField(source="member.user.username")


class TeamInvoiceListApi(TeamAdminApi):
    FilterSerializer = TeamInvoiceFilterSerializer
    OutputSerializer = TeamInvoiceSerializer

    @extend_schema(operation_id="team_invoices_list", tags=TEAM, parameters=[SLUG, TeamInvoiceFilterSerializer],
                   summary="The team's invoices (drafts included), newest month first",
                   responses={200: TeamInvoiceSerializer(many=True), **ADMIN_ERRORS})
    def get(self, request, slug: str):
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        month = filters.validated_data.get("month")
        start = date.fromisoformat(month + "-01") if month else None
        return Response(TeamInvoiceSerializer(team_invoices(team=request.team, start=start), many=True).data)


class TeamInvoiceDetailApi(TeamAdminApi):
    OutputSerializer = InvoiceDetailSerializer

    @extend_schema(operation_id="team_invoices_retrieve", tags=TEAM, parameters=[SLUG],
                   summary="One of the team's invoices with its lines",
                   responses={200: InvoiceDetailSerializer, **ADMIN_ERRORS})
    def get(self, request, slug: str, invoice_id: int):
        invoice = get_or_404(team_invoices(team=request.team), pk=invoice_id)
        return Response(invoice_detail_data(invoice))


# --- audit trail and upstreams ------------------------------------------------------------

class AuditEventListApi(TeamAdminApi):
    pagination_class = AuditPagination

    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        kind = serializers.ChoiceField(choices=AuditEvent.Kind.choices)
        created_at = serializers.DateTimeField()
        actor = serializers.CharField(source="actor.username", allow_null=True, default=None)
        member_id = serializers.IntegerField(allow_null=True)
        member = serializers.CharField(source="member.user.username", allow_null=True, default=None)
        subject_id = serializers.IntegerField(allow_null=True)
        reason = serializers.CharField()
        data = serializers.JSONField()

    @extend_schema(operation_id="team_audit_events_list", tags=TEAM, parameters=[SLUG],
                   summary="The team's audit trail, newest first (cursor pagination)",
                   responses={200: OutputSerializer(many=True), **ADMIN_ERRORS})
    def get(self, request, slug: str):
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(team_audit_events(team=request.team), request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)


class HealthSampleSerializer(serializers.Serializer):
    taken_at = serializers.DateTimeField()
    ok = serializers.BooleanField(help_text="false: /metrics could not be read (see error).")
    error = serializers.CharField()
    running = serializers.IntegerField(allow_null=True, help_text="vllm:num_requests_running")
    waiting = serializers.IntegerField(allow_null=True, help_text="vllm:num_requests_waiting")
    kv_cache_usage = serializers.FloatField(allow_null=True, help_text="vllm:kv_cache_usage_perc, 0 to 1")
    generation_tokens_per_second = serializers.FloatField(allow_null=True,
                                                          help_text="Since the previous sample.")
    ttft_mean_seconds = serializers.FloatField(allow_null=True,
                                               help_text="Mean time to first token since the previous sample.")


class UpstreamListApi(TeamAdminApi):
    class OutputSerializer(serializers.Serializer):
        name = serializers.CharField()
        enabled = serializers.BooleanField(help_text="false: the gateway routes nothing to it.")
        max_concurrency = serializers.IntegerField()
        models = serializers.SerializerMethodField()
        health = HealthSampleSerializer(allow_null=True, help_text="The newest sample of its vLLM /metrics "
                                        "(taken every minute; null: none yet or disabled).")

        def get_models(self, upstream) -> list[str]:
            return sorted(route.model.name for route in upstream.routes.all())

    @extend_schema(operation_id="team_upstreams_list", tags=TEAM, parameters=[SLUG],
                   summary="The catalog's upstreams, whether enabled, the models routed to them and their health",
                   responses={200: OutputSerializer(many=True), **ADMIN_ERRORS})
    def get(self, request, slug: str):
        latest = {upstream.pk: sample for upstream, sample in health_latest()}
        upstreams = list(upstream_list())
        for upstream in upstreams:
            upstream.health = latest.get(upstream.pk)
        return Response(self.OutputSerializer(upstreams, many=True).data)
