"""OpenAI-style organization usage and costs (/v1/organization/...), read with a team admin's key.

Shaped like OpenAI's Usage and Costs APIs so their clients and dashboards work: pages of
daily buckets. The "organization" is the key's team; buckets are the team's calendar days
(its time zone), so a bucket's start_time is a local midnight. Only bucket_width=1d.
"""
import base64
import binascii
import calendar
import zoneinfo
from datetime import date, datetime, time, timedelta

from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from api.access import OrganizationApi
from api.errors import error
from api.selectors import cached_tokens_by_day, team_month_costs
from billing.money import allocate, quantize
from billing.reports import days, usage_by_day
from tenants.selectors import member_list

ORG = ["organization"]
MAX_TIME = 32503680000  # 3000-01-01: later times are refused, not overflowed
BUCKET_WIDTH_ONLY = _("Only bucket_width=1d is supported.")
GROUP_ONE = _("Group by one of user_id or model at a time.")
PAGE_INVALID = _("Invalid page: use next_page of the previous response.")
RANGE_INVALID = _("end_time must be after start_time.")

ORG_ERRORS = {
    400: error("Invalid parameters: `fields` says which."),
    401: error("No credentials, or an invalid, revoked or expired key."),
    403: error("The key's member is not an admin of their team."),
    429: error("Too many requests from this user."),
}


def _local_day(team_tz: zoneinfo.ZoneInfo, seconds: int) -> date:
    return datetime.fromtimestamp(seconds, tz=team_tz).date()


def _midnight(team_tz: zoneinfo.ZoneInfo, day: date) -> int:
    return int(datetime.combine(day, time(0), tzinfo=team_tz).timestamp())


def _encode_page(day: date) -> str:
    return base64.urlsafe_b64encode(day.isoformat().encode()).decode("ascii")


class BucketQuerySerializer(serializers.Serializer):
    start_time = serializers.IntegerField(min_value=0, max_value=MAX_TIME,
                                          help_text="Unix seconds, inclusive (its team-local day's bucket).")
    end_time = serializers.IntegerField(min_value=0, max_value=MAX_TIME, required=False,
                                        help_text="Unix seconds, exclusive; default: now.")
    bucket_width = serializers.ChoiceField(choices=[("1d", "1d")], required=False, default="1d",
                                           error_messages={"invalid_choice": BUCKET_WIDTH_ONLY})
    page = serializers.CharField(required=False, max_length=64, help_text="next_page of the previous response.")

    max_limit = 31

    def validate(self, attrs):
        tz = zoneinfo.ZoneInfo(self.context["team"].timezone)
        end = attrs.get("end_time", int(timezone.now().timestamp()))
        if end <= attrs["start_time"]:
            raise serializers.ValidationError({"end_time": [RANGE_INVALID]})
        since = _local_day(tz, attrs["start_time"])
        until = _local_day(tz, end - 1) + timedelta(days=1)
        first = since
        if attrs.get("page"):
            try:
                first = date.fromisoformat(base64.urlsafe_b64decode(attrs["page"].encode("ascii")).decode())
            except (ValueError, UnicodeError, binascii.Error):
                raise serializers.ValidationError({"page": [PAGE_INVALID]}) from None
            if not since <= first < until:
                raise serializers.ValidationError({"page": [PAGE_INVALID]})
        last = min(until, first + timedelta(days=attrs["limit"]))
        return {**attrs, "tz": tz, "since": first, "until": last, "has_more": last < until}


def _page(data: list, query: dict) -> dict:
    return {"object": "page", "data": data, "has_more": query["has_more"],
            "next_page": _encode_page(query["until"]) if query["has_more"] else None}


# --- usage --------------------------------------------------------------------------------

class UsageQuerySerializer(BucketQuerySerializer):
    group_by = serializers.ListField(child=serializers.ChoiceField(choices=[("user_id", "user_id"),
                                                                            ("model", "model")]),
                                     required=False, default=list, help_text="user_id or model.")
    limit = serializers.IntegerField(min_value=1, max_value=31, required=False, default=7,
                                     help_text="Buckets per page (1 to 31).")

    def validate(self, attrs):
        if len(set(attrs["group_by"])) > 1:
            raise serializers.ValidationError({"group_by": [GROUP_ONE]})
        return super().validate(attrs)


class UsageResultSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=[("organization.usage.completions.result",) * 2])
    input_tokens = serializers.IntegerField(help_text="Prompt tokens (cached ones included).")
    output_tokens = serializers.IntegerField(help_text="Completion tokens.")
    input_cached_tokens = serializers.IntegerField(help_text="Prompt tokens served from vLLM's prefix cache.")
    input_audio_tokens = serializers.IntegerField(help_text="Always 0.")
    output_audio_tokens = serializers.IntegerField(help_text="Always 0.")
    num_model_requests = serializers.IntegerField(help_text="Answered requests (billing counts them).")
    project_id = serializers.CharField(allow_null=True, help_text="Always null.")
    user_id = serializers.CharField(allow_null=True, help_text="With group_by=user_id: the member's username.")
    api_key_id = serializers.CharField(allow_null=True, help_text="Always null.")
    model = serializers.CharField(allow_null=True, help_text="With group_by=model: the public model name.")
    batch = serializers.BooleanField(allow_null=True, help_text="Always null.")


class UsageBucketSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=[("bucket", "bucket")])
    start_time = serializers.IntegerField()
    end_time = serializers.IntegerField()
    results = UsageResultSerializer(many=True)


class UsagePageSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=[("page", "page")])
    data = UsageBucketSerializer(many=True)
    has_more = serializers.BooleanField()
    next_page = serializers.CharField(allow_null=True)


class OrganizationUsageCompletionsApi(OrganizationApi):
    FilterSerializer = UsageQuerySerializer
    OutputSerializer = UsagePageSerializer

    @extend_schema(operation_id="organization_usage_completions", tags=ORG, parameters=[UsageQuerySerializer],
                   summary="Completions usage per day, OpenAI-style (the key's team)",
                   responses={200: UsagePageSerializer, **ORG_ERRORS})
    def get(self, request):
        team = request.team
        query = self.FilterSerializer(data=request.query_params, context={"team": team})
        query.is_valid(raise_exception=True)
        q = query.validated_data
        group = q["group_by"][0] if q["group_by"] else None
        by = {"user_id": "member", "model": "model"}.get(group)
        rows = usage_by_day(team=team, since=q["since"], until=q["until"], by=by)
        cached = cached_tokens_by_day(team=team, since=q["since"], until=q["until"], by=by)
        names = dict(member_list(team=team).values_list("pk", "user__username")) if by == "member" else {}
        per_day: dict[date, list] = {}
        for r in rows:
            per_day.setdefault(r.day, []).append({
                "object": "organization.usage.completions.result", "input_tokens": r.prompt_tokens,
                "output_tokens": r.completion_tokens, "input_cached_tokens": cached.get((r.day, r.key), 0),
                "input_audio_tokens": 0, "output_audio_tokens": 0, "num_model_requests": r.requests,
                "project_id": None, "user_id": names.get(r.key) if by == "member" else None,
                "api_key_id": None, "model": r.key if by == "model" else None, "batch": None})
        tz = q["tz"]
        data = [{"object": "bucket", "start_time": _midnight(tz, d), "end_time": _midnight(tz, d + timedelta(days=1)),
                 "results": per_day.get(d, [])} for d in days(q["since"], q["until"])]
        return Response(UsagePageSerializer(_page(data, q)).data)


# --- costs --------------------------------------------------------------------------------

class CostsQuerySerializer(BucketQuerySerializer):
    group_by = serializers.ListField(child=serializers.ChoiceField(choices=[("project_id", "project_id"),
                                                                            ("line_item", "line_item")]),
                                     required=False, default=list, help_text="project_id and/or line_item.")
    limit = serializers.IntegerField(min_value=1, max_value=180, required=False, default=7,
                                     help_text="Buckets per page (1 to 180).")


class AmountSerializer(serializers.Serializer):
    value = serializers.FloatField(help_text="In the currency's minor unit (a float, as OpenAI sends it).")
    currency = serializers.CharField(help_text="Lowercase ISO 4217, e.g. cny.")


class CostResultSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=[("organization.costs.result",) * 2])
    amount = AmountSerializer()
    line_item = serializers.CharField(allow_null=True,
                                      help_text="With group_by=line_item: actual_cost or planned_cost.")
    project_id = serializers.CharField(allow_null=True, help_text="With group_by=project_id: the team's slug.")


class CostBucketSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=[("bucket", "bucket")])
    start_time = serializers.IntegerField()
    end_time = serializers.IntegerField()
    results = CostResultSerializer(many=True)


class CostsPageSerializer(serializers.Serializer):
    object = serializers.ChoiceField(choices=[("page", "page")])
    data = CostBucketSerializer(many=True)
    has_more = serializers.BooleanField()
    next_page = serializers.CharField(allow_null=True)


def _daily_costs(team, since: date, until: date) -> dict[date, tuple]:
    """Each day's part of its month's cost: the month spread evenly over its days, parts summing to it exactly."""
    months = sorted({d.replace(day=1) for d in days(since, until)})
    costs = team_month_costs(team=team, months=months)
    out = {}
    for month in months:
        cost, actual = costs[month]
        n = calendar.monthrange(month.year, month.month)[1]
        parts = allocate(quantize(cost, team.currency), {k: 1 for k in range(n)}, team.currency)
        for k in range(n):
            out[month + timedelta(days=k)] = (parts[k], actual)
    return out


class OrganizationCostsApi(OrganizationApi):
    FilterSerializer = CostsQuerySerializer
    OutputSerializer = CostsPageSerializer

    @extend_schema(operation_id="organization_costs", tags=ORG, parameters=[CostsQuerySerializer],
                   summary="The team's cost per day, OpenAI-style",
                   description="Each month's cost (a closed month's split cost, else the team's monthly cost) "
                               "spread evenly over its days; days after today are not reported.",
                   responses={200: CostsPageSerializer, **ORG_ERRORS})
    def get(self, request):
        team = request.team
        query = self.FilterSerializer(data=request.query_params, context={"team": team})
        query.is_valid(raise_exception=True)
        q = query.validated_data
        tz = q["tz"]
        tomorrow = timezone.now().astimezone(tz).date() + timedelta(days=1)
        shown = days(q["since"], min(q["until"], tomorrow))
        daily = _daily_costs(team, q["since"], q["until"]) if shown else {}
        data = []
        for d in days(q["since"], q["until"]):
            results = []
            if d in daily and d < tomorrow:
                amount, actual = daily[d]
                results.append({"object": "organization.costs.result",
                                "amount": {"value": float(amount), "currency": team.currency.lower()},
                                "line_item": ("actual_cost" if actual else "planned_cost")
                                if "line_item" in q["group_by"] else None,
                                "project_id": team.slug if "project_id" in q["group_by"] else None})
            data.append({"object": "bucket", "start_time": _midnight(tz, d),
                         "end_time": _midnight(tz, d + timedelta(days=1)), "results": results})
        return Response(CostsPageSerializer(_page(data, q)).data)
