"""The caller's own membership: profile, quota and projected cost; keys; usage; issued invoices."""
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from api.access import TEAM_PARAMETER, MemberApi, get_or_404
from api.apis.common import (
    DateRangeSerializer, DayUsageSerializer, InvoiceDetailSerializer, InvoiceSerializer, MoneySerializer,
    ReasonInputSerializer, StrictInputSerializer, UsageFilterSerializer, UsageRowSerializer, invoice_detail_data,
)
from api.errors import MEMBER_ERRORS, OBJECT_ERRORS
from api.pagination import KeysetPagination
from api.selectors import member_invoices_issued
from billing.reports import member_projection, usage_by_day, usage_rows
from tenants.models import Member
from tenants.selectors import member_key_list, member_quota_this_month, memberships_for_user
from tenants.services import api_key_issue, api_key_revoke

ME = ["me"]


class MembershipSerializer(serializers.Serializer):
    id = serializers.IntegerField(help_text="The membership's id.")
    team = serializers.SlugField(source="team.slug")
    team_name = serializers.CharField(source="team.name")
    timezone = serializers.CharField(source="team.timezone")
    currency = serializers.CharField(source="team.currency")
    role = serializers.ChoiceField(choices=Member.Role.choices)


class QuotaSerializer(serializers.Serializer):
    period_start = serializers.DateField()
    resets_at = serializers.DateTimeField()
    requests_used = serializers.IntegerField()
    request_limit = serializers.IntegerField(allow_null=True, help_text="null: unlimited.")
    tokens_used = serializers.IntegerField()
    token_limit = serializers.IntegerField(allow_null=True, help_text="null: unlimited.")


class ProjectionSerializer(serializers.Serializer):
    month = serializers.CharField()
    status = serializers.CharField(help_text="The period's status (open while the month runs).")
    projected = serializers.BooleanField(help_text="true: the month so far under today's policy and cost.")
    currency = serializers.CharField()
    team_cost = MoneySerializer()
    policy = serializers.CharField()
    billed = serializers.BooleanField(help_text="false: you have no share this month (yet).")
    amount = MoneySerializer(allow_null=True)
    share = serializers.DecimalField(max_digits=9, decimal_places=8, coerce_to_string=True, allow_null=True)
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()


class KeySerializer(serializers.Serializer):
    id = serializers.IntegerField()
    prefix = serializers.CharField(help_text="The key's first characters, to tell keys apart (never usable).")
    label = serializers.CharField()
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(allow_null=True)
    expires_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)


class ProfileDetailApi(MemberApi):
    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField(help_text="The user's id.")
        username = serializers.CharField()
        email = serializers.CharField()
        membership = MembershipSerializer(help_text="The membership this call acts as.")
        memberships = MembershipSerializer(many=True)
        quota = QuotaSerializer(help_text="This month's use and limits.")
        projection = ProjectionSerializer(help_text="Your share of the team's month so far.")

    @extend_schema(operation_id="me_retrieve", tags=ME, parameters=[TEAM_PARAMETER],
                   summary="Your profile, memberships, this month's quota and projected cost",
                   responses={200: OutputSerializer, **MEMBER_ERRORS})
    def get(self, request):
        member = request.member
        projection = member_projection(member=member)
        report, row = projection.report, projection.row
        data = {
            "id": request.user.pk, "username": request.user.get_username(), "email": request.user.email,
            "membership": member, "memberships": list(memberships_for_user(user=request.user)),
            "quota": member_quota_this_month(member=member),
            "projection": {
                "month": f"{report.start:%Y-%m}", "status": report.status, "projected": report.projected,
                "currency": report.currency, "team_cost": report.cost, "policy": report.policy,
                "billed": row is not None, "amount": row.amount if row else None,
                "share": row.share if row else None, "requests": row.requests if row else 0,
                "prompt_tokens": row.prompt_tokens if row else 0,
                "completion_tokens": row.completion_tokens if row else 0,
            },
        }
        return Response(self.OutputSerializer(data).data)


class ApiKeyListApi(MemberApi):
    OutputSerializer = KeySerializer

    @extend_schema(operation_id="me_keys_list", tags=ME, parameters=[TEAM_PARAMETER],
                   summary="Your API keys (revoked ones included), newest first",
                   responses={200: KeySerializer(many=True), **MEMBER_ERRORS})
    def get(self, request):
        return Response(KeySerializer(member_key_list(member=request.member), many=True).data)


class ApiKeyCreateApi(MemberApi):
    class InputSerializer(StrictInputSerializer):
        label = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
        expires_days = serializers.IntegerField(min_value=1, max_value=3650, required=False, allow_null=True,
                                                default=None, help_text="Days until it stops working; "
                                                                         "null or absent: never.")

    class OutputSerializer(KeySerializer):
        key = serializers.CharField(help_text="The key itself: shown this once, never stored (only its hash).")

    @extend_schema(operation_id="me_keys_create", tags=ME, parameters=[TEAM_PARAMETER], request=InputSerializer,
                   summary="Issue a new API key (returned once)",
                   responses={201: OutputSerializer, **MEMBER_ERRORS})
    def post(self, request):
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key, raw = api_key_issue(member=request.member, label=serializer.validated_data["label"],
                                 expires_days=serializer.validated_data["expires_days"], actor=request.user)
        key.key = raw
        response = Response(self.OutputSerializer(key).data, status=status.HTTP_201_CREATED)
        response["Cache-Control"] = "no-store"
        return response


class ApiKeyRevokeApi(MemberApi):
    InputSerializer = ReasonInputSerializer
    OutputSerializer = KeySerializer

    @extend_schema(operation_id="me_keys_revoke", tags=ME, parameters=[TEAM_PARAMETER],
                   request=ReasonInputSerializer, summary="Revoke one of your keys (stops working within seconds)",
                   responses={200: KeySerializer, **OBJECT_ERRORS})
    def post(self, request, key_id: int):
        key = get_or_404(member_key_list(member=request.member), pk=key_id)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        key = api_key_revoke(key=key, actor=request.user, reason=serializer.validated_data["reason"])
        return Response(KeySerializer(key).data)


class UsageListApi(MemberApi):
    FilterSerializer = UsageFilterSerializer
    OutputSerializer = UsageRowSerializer
    pagination_class = KeysetPagination

    @extend_schema(operation_id="me_usage_list", tags=ME, parameters=[TEAM_PARAMETER, UsageFilterSerializer],
                   summary="Your requests, newest first (cursor pagination)",
                   responses={200: UsageRowSerializer(many=True), **MEMBER_ERRORS})
    def get(self, request):
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        member = request.member
        rows = usage_rows(team=member.team, member=member, **filters.validated_data)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(rows, request, view=self)
        return paginator.get_paginated_response(UsageRowSerializer(page, many=True).data)


class UsageDailyFilterSerializer(DateRangeSerializer):
    by = serializers.ChoiceField(choices=[("model", "model")], required=False, allow_null=True, default=None,
                                 help_text="model: one row per day and model.")


class UsageDailyApi(MemberApi):
    FilterSerializer = UsageDailyFilterSerializer

    class OutputSerializer(DayUsageSerializer):
        model = serializers.CharField(allow_null=True, help_text="With by=model; else null.")

    @extend_schema(operation_id="me_usage_daily", tags=ME, parameters=[TEAM_PARAMETER, UsageDailyFilterSerializer],
                   summary="Your counted usage per day of the team's calendar (and per model)",
                   description="Only answered requests (billing counts them); default: the last 30 days.",
                   responses={200: OutputSerializer(many=True), **MEMBER_ERRORS})
    def get(self, request):
        member = request.member
        filters = self.FilterSerializer(data=request.query_params, context={"team": member.team})
        filters.is_valid(raise_exception=True)
        f = filters.validated_data
        days = usage_by_day(team=member.team, since=f["since"], until=f["until"], member=member, by=f["by"])
        data = [{"day": d.day, "model": d.key, "requests": d.requests, "prompt_tokens": d.prompt_tokens,
                 "completion_tokens": d.completion_tokens, "tokens": d.tokens} for d in days]
        return Response(self.OutputSerializer(data, many=True).data)


class InvoiceListApi(MemberApi):
    OutputSerializer = InvoiceSerializer

    @extend_schema(operation_id="me_invoices_list", tags=ME, parameters=[TEAM_PARAMETER],
                   summary="Your issued invoices, newest month first",
                   responses={200: InvoiceSerializer(many=True), **MEMBER_ERRORS})
    def get(self, request):
        return Response(InvoiceSerializer(member_invoices_issued(member=request.member), many=True).data)


class InvoiceDetailApi(MemberApi):
    OutputSerializer = InvoiceDetailSerializer

    @extend_schema(operation_id="me_invoices_retrieve", tags=ME, parameters=[TEAM_PARAMETER],
                   summary="One of your issued invoices with its lines",
                   responses={200: InvoiceDetailSerializer, **OBJECT_ERRORS})
    def get(self, request, invoice_id: int):
        invoice = get_or_404(member_invoices_issued(member=request.member), pk=invoice_id)
        return Response(invoice_detail_data(invoice))
