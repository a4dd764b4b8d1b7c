"""OpenAI-style /v1/organization/usage/completions and /costs: shapes, figures against the usage rows, and the
ASGI route (a real HTTP client against uvicorn running qwenhub.asgi)."""
import zoneinfo
from collections import defaultdict
from datetime import date, datetime, time, timedelta
from decimal import Decimal

import httpx
import pytest
from django.urls import reverse

from api.tests.conftest import local, month_before
from billing.models import BillingPeriod, UsageRecord
from billing.selectors import BILLED_STATUSES
from tenants.tests.factories import UsageRecordFactory

USAGE = reverse("organization:usage-completions")
COSTS = reverse("organization:costs")


def _ts(team, day: date) -> int:
    return int(datetime.combine(day, time(0), tzinfo=zoneinfo.ZoneInfo(team.timezone)).timestamp())


def _rows_by_day(team, since: date, until: date, key):
    """What the buckets must say, straight from the usage rows."""
    tz = zoneinfo.ZoneInfo(team.timezone)
    sums = defaultdict(lambda: [0, 0, 0, 0])
    for row in UsageRecord.objects.filter(team=team, status__in=BILLED_STATUSES):
        day = row.started_at.astimezone(tz).date()
        if since <= day < until:
            s = sums[(day, key(row))]
            s[0] += row.prompt_tokens
            s[1] += row.completion_tokens
            s[2] += row.cached_tokens
            s[3] += 1
    return {k: tuple(v) for k, v in sums.items()}


def _buckets_by_day(team, body, field):
    out = {}
    for bucket in body["data"]:
        day = datetime.fromtimestamp(bucket["start_time"], tz=zoneinfo.ZoneInfo(team.timezone)).date()
        assert bucket["end_time"] - bucket["start_time"] == 86400 and bucket["object"] == "bucket"
        for r in bucket["results"]:
            assert r["object"] == "organization.usage.completions.result"
            out[(day, r[field] if field else None)] = (r["input_tokens"], r["output_tokens"],
                                                       r["input_cached_tokens"], r["num_model_requests"])
    return out


@pytest.fixture
def usage_days(world):
    day = world.this_month
    t = world.team
    UsageRecordFactory(member=world.member, model="a", cached_tokens=40, started_at=local(t, day.year, day.month, 1, 0, 5))
    UsageRecordFactory(member=world.other, model="b", started_at=local(t, day.year, day.month, 1, 23, 55))
    UsageRecordFactory(member=world.member, model="a", status="upstream_error",
                       started_at=local(t, day.year, day.month, 1, 12))
    prev = month_before(day) + timedelta(days=27)
    UsageRecordFactory(member=world.member, model="b", cached_tokens=7,
                       started_at=local(t, prev.year, prev.month, prev.day, 9))
    UsageRecordFactory(member=world.member_b)  # another team
    return world


@pytest.mark.parametrize(("group_by", "field", "key"), [
    (None, None, lambda r: None), ("model", "model", lambda r: r.model),
    ("user_id", "user_id", lambda r: r.member.user.username)])
def test_usage_completions_buckets_match_the_usage_rows(usage_days, group_by, field, key):
    w = usage_days
    since = month_before(w.this_month)
    until = w.this_month + timedelta(days=2)
    query = {"start_time": _ts(w.team, since), "end_time": _ts(w.team, until), "limit": 31}
    if group_by:
        query["group_by"] = group_by
    seen, page = {}, None
    while True:
        body = w.client(w.admin).get(USAGE, {**query, **({"page": page} if page else {})}).json()
        assert body["object"] == "page"
        seen.update(_buckets_by_day(w.team, body, field))
        if not body["has_more"]:
            assert body["next_page"] is None
            break
        page = body["next_page"]
    assert seen == _rows_by_day(w.team, since, until, key)
    assert len(seen) >= 2


def test_usage_pages_have_limit_buckets_each(usage_days):
    w = usage_days
    since = w.this_month - timedelta(days=10)
    query = {"start_time": _ts(w.team, since), "end_time": _ts(w.team, since + timedelta(days=10)), "limit": 4}
    first = w.client(w.admin).get(USAGE, query).json()
    assert len(first["data"]) == 4 and first["has_more"]
    second = w.client(w.admin).get(USAGE, {**query, "page": first["next_page"]}).json()
    assert second["data"][0]["start_time"] == first["data"][-1]["end_time"]
    third = w.client(w.admin).get(USAGE, {**query, "page": second["next_page"]}).json()
    assert len(third["data"]) == 2 and not third["has_more"]


@pytest.mark.parametrize(("query", "field"), [
    ({}, "start_time"), ({"start_time": 100, "end_time": 50}, "end_time"),
    ({"start_time": 1, "bucket_width": "1h"}, "bucket_width"), ({"start_time": 1, "limit": 32}, "limit"),
    ({"start_time": 1, "group_by": ["model", "user_id"]}, "group_by"), ({"start_time": 1, "page": "nope"}, "page"),
    ({"start_time": 10**12}, "start_time")])
def test_usage_completions_rejects_bad_parameters(world, query, field):
    response = world.client(world.admin).get(USAGE, query)
    assert response.status_code == 400 and field in response.json()["error"]["fields"]


def test_a_member_key_is_refused_and_another_team_sees_only_its_own(usage_days):
    w = usage_days
    assert w.client(w.member).get(USAGE, {"start_time": 1}).status_code == 403
    since = w.this_month
    body = w.client(w.admin_b).get(USAGE, {"start_time": _ts(w.team_b, since), "group_by": "user_id"}).json()
    users = {r["user_id"] for b in body["data"] for r in b["results"]}
    assert users <= {w.member_b.user.username, w.admin_b.user.username}


def test_costs_spread_each_month_over_its_days_exactly(world):
    w = world
    period = BillingPeriod.objects.get(team=w.team, start=w.closed)
    next_month = w.this_month
    query = {"start_time": _ts(w.team, w.closed), "end_time": _ts(w.team, next_month), "limit": 31,
             "group_by": ["line_item", "project_id"]}
    body = w.client(w.admin).get(COSTS, query).json()
    results = [r for b in body["data"] for r in b["results"]]
    assert len(results) == len(body["data"]) == (next_month - w.closed).days
    assert sum(Decimal(str(r["amount"]["value"])) for r in results) == period.cost
    assert {r["line_item"] for r in results} == {"planned_cost"} and {r["project_id"] for r in results} == {"lab"}
    assert {r["amount"]["currency"] for r in results} == {"cny"}
    w.client(w.admin).post(reverse("api:team-period-actual-cost", kwargs={"slug": "lab", "month": w.closed}),
                           {"amount": "3100.00", "reason": "bill"}, format="json")
    body = w.client(w.admin).get(COSTS, query).json()
    results = [r for b in body["data"] for r in b["results"]]
    assert sum(Decimal(str(r["amount"]["value"])) for r in results) == Decimal("3100.00")
    assert {r["line_item"] for r in results} == {"actual_cost"}


def test_costs_do_not_report_days_after_today(world):
    w = world
    start = w.this_month
    body = w.client(w.admin).get(COSTS, {"start_time": _ts(w.team, start),
                                         "end_time": _ts(w.team, start + timedelta(days=60)), "limit": 60}).json()
    reported = [b for b in body["data"] if b["results"]]
    assert 1 <= len(reported) <= 31 and all(r["line_item"] is None for b in reported for r in b["results"])


# --- over real HTTP, through qwenhub.asgi ---------------------------------------------------

@pytest.fixture(scope="module")
def asgi_server(django_db_setup, tmp_path_factory):
    from proxy.gateway.tests.conftest import GatewayProcess

    process = GatewayProcess(tmp_path_factory.mktemp("asgi"))
    yield process
    process.stop()


def test_organization_usage_over_http_matches_the_usage_rows(transactional_db, asgi_server, settings):
    from billing.tests.factories import MemberJoinedFactory
    from tenants.models import Member
    from tenants.tests.factories import ApiKeyFactory, TeamFactory

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    team = TeamFactory(slug="http-lab", timezone="Asia/Shanghai")
    admin = MemberJoinedFactory(team=team, role=Member.Role.ADMIN)
    member = MemberJoinedFactory(team=team)
    raw = ApiKeyFactory(member=admin).raw
    today = datetime.now(zoneinfo.ZoneInfo(team.timezone)).date()
    for n, m in enumerate((admin, member, member)):
        UsageRecordFactory(member=m, model=f"m{n % 2}", prompt_tokens=10 + n, completion_tokens=n, cached_tokens=n,
                           started_at=local(team, today.year, today.month, today.day, 0, 1 + n))
    since, until = today - timedelta(days=1), today + timedelta(days=1)
    with httpx.Client(base_url=asgi_server.url, headers={"Authorization": f"Bearer {raw}"}, timeout=10) as http:
        response = http.get("/v1/organization/usage/completions",
                            params={"start_time": _ts(team, since), "end_time": _ts(team, until),
                                    "group_by": "user_id"})
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        got = _buckets_by_day(team, response.json(), "user_id")
        assert got == _rows_by_day(team, since, until, lambda r: r.member.user.username)
        assert got[(today, member.user.username)] == (23, 3, 3, 2)
        # the rest of /v1 still goes to the gateway (its own error shape), unknown organization paths to Django
        gateway = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert gateway.status_code == 401 and "error" in gateway.json()  # Django has no /v1/models: a 404
        missing = http.get("/v1/organization/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    anonymous = httpx.get(asgi_server.url + "/v1/organization/costs", params={"start_time": 1})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_required"
