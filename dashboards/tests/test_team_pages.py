"""The team admin's pages: only the team's admins see them, only their team's figures, in bounded queries."""
import csv
import io
import zoneinfo
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.cache import cache
from django.utils import timezone

from billing.reports import team_members_month
from billing.selectors import cost_report, current_period_start
from billing.tests.factories import usage
from proxy.models import UpstreamHealthSample
from tenants.models import Member
from tenants.services import api_key_issue, member_add, team_create
from tenants.tests.factories import UpstreamFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def team():
    return team_create(slug="lab", name="The Lab", timezone_name="Asia/Shanghai", monthly_cost="3000")


@pytest.fixture
def admin(team):
    return member_add(team=team, username="boss", password="pw-boss-123", role=Member.Role.ADMIN,
                      request_quota=100, token_quota=10_000)


@pytest.fixture
def admin_client(client, admin):
    client.login(username="boss", password="pw-boss-123")
    return client


@pytest.fixture
def month(team):
    return current_period_start(team=team)


def test_member_is_refused_with_403(client, team, admin):
    member_add(team=team, username="alice", password="pw-alice-123")
    client.login(username="alice", password="pw-alice-123")
    for url in ("/team/", "/team/periods/", "/team/export.csv", f"/team/members/{admin.pk}/"):
        assert client.get(url).status_code == 403, url


def test_anonymous_is_sent_to_login(client):
    response = client.get("/team/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_home_shows_each_member_with_the_reports_share_and_cost(admin_client, team, admin, month):
    alice = member_add(team=team, username="alice", request_quota=10, token_quota=1000)
    bob = member_add(team=team, username="bob")  # unlimited
    when = timezone.now() - timedelta(minutes=5)
    usage(alice, month, prompt=600, completion=200, started_at=when)  # tokens are what the counters say, below
    usage(bob, month, prompt=100, completion=100, started_at=when)
    from tenants.models import QuotaCounter
    QuotaCounter.objects.create(member=alice, period_start=month, requests_used=9, request_limit=10,
                                tokens_used=800, token_limit=1000)

    response = admin_client.get("/team/")
    assert response.status_code == 200
    page = response.content.decode()
    report = cost_report(team=team, start=month)
    amounts = {row.username: row.amount for row in report.rows}
    assert amounts["alice"] + amounts["bob"] + amounts.get("boss", Decimal(0)) == report.allocated
    # the page's figures are the report's (the close's own code), not a second formula
    assert response.context["report"].rows == report.rows
    rows = {use.member.user.username: (use, share) for use, share in response.context["members"]}
    assert rows["alice"][1].amount == amounts["alice"] and rows["alice"][0].token_bar == 80
    assert rows["alice"][0].request_bar == 90 and rows["alice"][0].tokens_left == 200
    assert rows["bob"][0].token_limit is None and rows["bob"][0].token_bar == 0
    assert 'style="width:80%"' in page and 'style="width:90%"' in page
    assert report.explanation and report.explanation in page.replace("&#x27;", "'")
    assert "¥3,000.00" in page
    # effective price: the month's cost ÷ the counted tokens × 1M
    assert response.context["effective_price"] == (Decimal("3000.00") * 1_000_000 / 1000).quantize(Decimal("0.000001"))


def test_home_shows_nothing_of_another_team(admin_client, team, month):
    other = team_create(slug="other", name="Other Lab", timezone_name="UTC")
    stranger = member_add(team=other, username="stranger")
    usage(stranger, current_period_start(team=other), prompt=5000, started_at=timezone.now())
    page = admin_client.get("/team/").content.decode()
    assert "stranger" not in page


def test_chart_stacks_top_members_and_others(admin_client, team, month):
    when = timezone.now() - timedelta(minutes=1)
    for n in range(9):
        member = member_add(team=team, username=f"m{n}")
        usage(member, month, prompt=100 * (n + 1), completion=0, started_at=when)
    chart = admin_client.get("/team/").context["chart"]
    names = [s.name for s in chart.series]
    assert names[:7] == ["m8", "m7", "m6", "m5", "m4", "m3", "m2"] and names[7] == "others"
    assert sum(chart.series[7].values) == 100 + 200  # m0 and m1
    assert sum(sum(s.values) for s in chart.series) == sum(100 * (n + 1) for n in range(9))


def test_chart_leaves_out_failed_requests(admin_client, team, month):
    alice = member_add(team=team, username="alice")
    when = timezone.now() - timedelta(minutes=1)
    usage(alice, month, prompt=100, completion=0, started_at=when)
    usage(alice, month, prompt=5000, completion=0, started_at=when, status="upstream_error")
    chart = admin_client.get("/team/").context["chart"]
    assert sum(sum(s.values) for s in chart.series) == 100


def test_home_query_count_does_not_grow_with_members_and_rows(admin_client, team, month,
                                                               django_assert_num_queries):
    UpstreamFactory(name="gpu-a")
    when = timezone.now() - timedelta(minutes=1)

    def add(n0, n):
        for i in range(n0, n0 + n):
            member = member_add(team=team, username=f"u{i:03d}", request_quota=1000)
            api_key_issue(member=member, label="k")
            for _r in range(3):
                usage(member, month, started_at=when, model=f"model-{i % 3}")

    add(0, 3)
    admin_client.get("/team/")  # warm the session
    cache.clear()  # the month's split and past days are cached (dashboards.cache): count a cold render
    today = timezone.localtime(timezone.now(), zoneinfo.ZoneInfo(team.timezone)).date()
    # the month's past days and today are two queries (on the 1st there are no past days), and
    # where the rollups end is one more for the past days and one for the split
    with django_assert_num_queries(14 + 2 * (today.day > 1)) as first:
        assert admin_client.get("/team/").status_code == 200
    with django_assert_num_queries(8):  # warm: the split and the past days come from the cache
        assert admin_client.get("/team/").status_code == 200
    add(3, 47)
    cache.clear()
    with django_assert_num_queries(len(first.captured_queries)):
        response = admin_client.get("/team/")
    assert len(response.context["members"]) == 51


def test_health_shows_latest_sample_and_a_down_upstream(admin_client):
    up = UpstreamFactory(name="gpu-a")
    down = UpstreamFactory(name="gpu-b")
    UpstreamFactory(name="gpu-off", enabled=False)
    now = timezone.now()
    UpstreamHealthSample.objects.create(upstream=up, taken_at=now - timedelta(minutes=2), ok=True, running=1,
                                        waiting=0, kv_cache_usage=0.1)
    UpstreamHealthSample.objects.create(upstream=up, taken_at=now - timedelta(minutes=1), ok=True, running=3,
                                        waiting=2, kv_cache_usage=0.25, generation_tokens_per_second=41.5,
                                        ttft_mean_seconds=0.125)
    UpstreamHealthSample.objects.create(upstream=down, taken_at=now, ok=False, error="unreachable: ConnectError")
    response = admin_client.get("/team/")
    page = response.content.decode()
    health = {row["upstream"].name: row for row in response.context["health"]}
    assert set(health) == {"gpu-a", "gpu-b"}
    assert health["gpu-a"]["latest"].running == 3 and len(health["gpu-a"]["recent"]) == 2
    assert sum(health["gpu-a"]["chart"].series[0].values) == 4
    assert "41.5" in page and "0.125" in page and "25.00%" in page
    assert "unreachable: ConnectError" in page


def test_staff_see_the_admin_link_others_do_not(admin_client, admin, team):
    assert f"/admin/tenants/team/{team.pk}/change/" not in admin_client.get("/team/").content.decode()
    admin.user.is_staff = True
    admin.user.save()
    assert f"/admin/tenants/team/{team.pk}/change/" in admin_client.get("/team/").content.decode()


def test_invite_link_is_on_the_page(admin_client):
    assert "/accounts/invite/" in admin_client.get("/team/").content.decode()


def test_csv_export_is_the_months_usage_per_member_and_model(admin_client, team, month):
    alice = member_add(team=team, username="alice")
    bob = member_add(team=team, username="bob")
    when = timezone.now() - timedelta(minutes=1)
    usage(alice, month, prompt=10, completion=5, model="qwen", started_at=when)
    usage(alice, month, prompt=20, completion=5, model="qwen", started_at=when)
    usage(alice, month, prompt=1, completion=1, model="llama", started_at=when)
    usage(bob, month, prompt=7, completion=3, model="qwen", started_at=when)
    usage(bob, month, prompt=999, completion=9, model="qwen", started_at=when, status="rejected")
    other = member_add(team=team_create(slug="other", name="Other"), username="stranger")
    usage(other, current_period_start(team=other.team), prompt=5, started_at=when)

    response = admin_client.get("/team/export.csv")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert response.streaming
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    m = f"{month:%Y-%m}"
    assert rows == [
        ["month", "member", "model", "requests", "prompt_tokens", "completion_tokens", "total_tokens",
         "cached_tokens"],
        [m, "alice", "llama", "1", "1", "1", "2", "0"],
        [m, "alice", "qwen", "2", "30", "10", "40", "0"],
        [m, "bob", "qwen", "1", "7", "3", "10", "0"],
    ]


def test_csv_export_of_another_month_and_a_bad_month(admin_client, team, month):
    alice = member_add(team=team, username="alice")
    last = (month - timedelta(days=1)).replace(day=1)
    usage(alice, last, prompt=4, completion=4)
    rows = list(csv.reader(io.StringIO(b"".join(
        admin_client.get(f"/team/export.csv?month={last:%Y-%m}").streaming_content).decode())))
    assert rows[1][:4] == [f"{last:%Y-%m}", "alice", "qwen2.5-7b-instruct", "1"] and len(rows) == 2
    assert admin_client.get("/team/export.csv?month=2026-13").status_code == 400
    assert admin_client.get("/team/export.csv?month=nope").status_code == 400


def test_members_month_uses_counter_else_member_quota(team, month):
    alice = member_add(team=team, username="alice", request_quota=5, token_quota=None)
    rows = {r.member.pk: r for r in team_members_month(team=team, start=month)}
    assert rows[alice.pk].request_limit == 5 and rows[alice.pk].requests_used == 0
    assert rows[alice.pk].token_limit is None and rows[alice.pk].used_share == 0.0


def test_home_is_fast_with_fifty_members_and_many_rows(admin_client, team, month):
    import time

    from billing.models import UsageRecord
    from tenants.tests.factories import UsageRecordFactory

    members = [member_add(team=team, username=f"u{i:03d}") for i in range(50)]
    when = timezone.now() - timedelta(minutes=1)
    UsageRecord.objects.bulk_create([
        UsageRecordFactory.build(member=m, team=team, period_start=month, prompt_tokens=10, completion_tokens=5,
                                 total_tokens=15, model=f"model-{n % 4}", status="ok", started_at=when)
        for m in members for n in range(60)])
    admin_client.get("/team/")
    began = time.perf_counter()
    response = admin_client.get("/team/")
    assert response.status_code == 200 and time.perf_counter() - began < 1.0
    assert len(response.context["members"]) == 51
