"""The member's overview: quota bars, the usage chart, the projected share, the quick start, keys and history."""
import re
import zoneinfo
from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.utils.html import escape

from billing.reports import member_projection
from billing.services import billing_policy_update
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.models import TeamQuotaCounter
from tenants.services import api_key_issue, member_add, quota_top_up, team_create
from tenants.tests.factories import (
    ModelRouteFactory, PublicModelFactory, QuotaCounterFactory, TeamFactory, UserFactory,
)

pytestmark = pytest.mark.django_db
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
NOV = date(2026, 11, 1)
# Nov 20 2026, 10:00 in Shanghai: 11 days to the reset on Dec 1.
NOW = datetime(2026, 11, 20, 10, tzinfo=SHANGHAI)


@pytest.fixture
def team():
    return team_create(slug="lab", name="The Lab", timezone_name="Asia/Shanghai")


@pytest.fixture
def lab():
    """lab (Shanghai, ¥3000/month, usage policy): alice and bob with usage in Nov 2026, carol without."""
    team = TeamFactory(slug="lab2", name="Lab Two", monthly_cost="3000.00")
    alice = MemberJoinedFactory(team=team, user=UserFactory(username="alice"), token_quota=10_000)
    bob = MemberJoinedFactory(team=team, user=UserFactory(username="bob"))
    MemberJoinedFactory(team=team, user=UserFactory(username="carol"))
    billing_policy_update(team=team, kind="usage")
    usage(alice, NOV, prompt=1000, completion=500, started_at=datetime(2026, 11, 3, 23, 30, tzinfo=SHANGHAI))
    usage(alice, NOV, prompt=2000, completion=1000, started_at=datetime(2026, 11, 4, 0, 30, tzinfo=SHANGHAI))
    usage(alice, NOV, prompt=777, completion=777, status="rejected")  # costs nothing, charted nowhere
    usage(bob, NOV, prompt=4500, completion=0, started_at=datetime(2026, 11, 5, 9, tzinfo=SHANGHAI))
    usage(alice, date(2026, 9, 1), prompt=300, completion=200, started_at=datetime(2026, 9, 9, 9, tzinfo=SHANGHAI))
    QuotaCounterFactory(member=alice, period_start=NOV, requests_used=2, tokens_used=9_000)
    return team, alice, bob


def test_member_sees_top_up_with_who_and_why(client, team):
    alice = member_add(team=team, username="alice", password="pw-alice-123", request_quota=100, token_quota=5000)
    bob = member_add(team=team, username="bob", password="pw-bob-123", request_quota=7)
    api_key_issue(member=alice, label="laptop")
    api_key_issue(member=bob, label="bobs-secret-label")
    boss = get_user_model().objects.create_user("boss", password="x")
    quota_top_up(member=alice, requests=50, actor=boss, reason="conference deadline")
    quota_top_up(member=bob, requests=3, actor=boss, reason="bob only")

    client.login(username="alice", password="pw-alice-123")
    page = client.get("/").content.decode()
    assert "conference deadline" in page and "boss" in page and "+50 requests" in page
    assert "150" in page  # this month's request limit after the top-up
    assert "laptop" in page
    assert "bob only" not in page and "bobs-secret-label" not in page


def test_anonymous_is_sent_to_login(client):
    response = client.get("/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")


def test_a_suspended_member_sees_no_team(client, lab):
    team, alice, _ = lab
    alice.is_active = False
    alice.save(update_fields=["is_active"])
    client.force_login(alice.user)
    response = client.get("/")
    assert response.status_code == 403 and "Lab Two" not in response.content.decode()
    assert client.get("/keys/").status_code == 403


@time_machine.travel(NOW, tick=False)
def test_quota_bars_reset_days_and_the_team_cap(client, lab):
    team, alice, _ = lab
    TeamQuotaCounter.objects.create(team=team, period_start=NOV, token_limit=20_000, tokens_used=5_000)
    client.force_login(alice.user)
    page = client.get("/").content.decode()
    assert "Resets in 11 days (2026-12-01 00:00)." in page
    assert re.search(r'id="tokens-used">9,000<.*?<span style="width:90%">', page, re.S)  # 9,000 of 10,000
    assert 'class="bar high"' in page
    cap = re.search(r'<tr id="team-cap">(.*?)</tr>', page, re.S).group(1)
    assert "5,000" in cap and "20,000" in cap and "width:25%" in cap


@time_machine.travel(datetime(2026, 11, 30, 23, 0, tzinfo=SHANGHAI), tick=False)
def test_on_the_months_last_day_it_resets_in_one_day_and_a_team_without_cap_shows_none(client, lab):
    _, alice, _ = lab
    client.force_login(alice.user)
    page = client.get("/").content.decode()
    assert "Resets in 1 day (2026-12-01 00:00)." in page and 'id="team-cap"' not in page


@time_machine.travel(NOW, tick=False)
def test_team_cap_without_a_counter_yet_is_the_teams_setting(client, lab):
    team, alice, _ = lab
    team.token_cap = 50_000
    team.save(update_fields=["token_cap"])
    client.force_login(alice.user)
    cap = re.search(r'<tr id="team-cap">(.*?)</tr>', client.get("/").content.decode(), re.S).group(1)
    assert "50,000" in cap and "width:0%" in cap


@time_machine.travel(NOW, tick=False)
def test_chart_of_this_month_per_team_day_prompt_and_completion(client, lab):
    _, alice, _ = lab
    client.force_login(alice.user)
    chart = client.get("/").context["chart"]
    assert len(chart.labels) == 30 and chart.labels[0] == "01"
    prompt, completion = chart.series
    # 23:30 on Nov 3 and 00:30 on Nov 4 in Shanghai are two days; the rejected row and bob are not in it
    assert (prompt.values[2], completion.values[2]) == (1000, 500)
    assert (prompt.values[3], completion.values[3]) == (2000, 1000)
    assert sum(prompt.values) == 3000 and sum(completion.values) == 1500


@time_machine.travel(NOW, tick=False)
def test_chart_switches_to_months_and_ignores_unknown_ranges(client, lab):
    _, alice, _ = lab
    client.force_login(alice.user)
    chart = client.get("/?months=3").context["chart"]
    assert chart.labels == ["2026-09", "2026-10", "2026-11"]
    assert [s.values for s in chart.series] == [[300, 0, 3000], [200, 0, 1500]]
    assert client.get("/?months=12").context["chart"].labels[0] == "2025-12"
    for bad in ("7", "x", "-1", "1e9"):
        assert len(client.get(f"/?months={bad}").context["chart"].labels) == 30


@time_machine.travel(NOW, tick=False)
def test_projection_is_the_closes_own_figure_with_the_policy_sentence(client, lab):
    team, alice, bob = lab
    client.force_login(alice.user)
    page = client.get("/").content.decode()
    projection = member_projection(member=alice)
    assert projection.row.amount == Decimal("1500.00")  # 4,500 of the month's 9,000 counted tokens
    projected = re.search(r'<section class="card" id="projection">(.*?)</section>', page, re.S).group(1)
    assert "CN¥1,500.00" in projected and "50.00%" in projected and "CN¥3,000.00" in projected
    assert projection.report.explanation and escape(projection.report.explanation) in projected


@time_machine.travel(NOW, tick=False)
def test_a_member_without_a_share_is_told_so(client, lab):
    team, *_ = lab
    dave = MemberJoinedFactory(team=team, user=UserFactory(username="dave"),
                               joined_at=datetime(2026, 12, 5, tzinfo=SHANGHAI))
    client.force_login(dave.user)
    assert "You are not billed for this month so far." in client.get("/").content.decode()


@time_machine.travel(NOW, tick=False)
def test_quick_start_lists_the_models_the_member_may_use(client, lab, settings):
    _, alice, bob = lab
    settings.QWENHUB_PUBLIC_URL = "https://llm.example.org/"
    small = ModelRouteFactory(model=PublicModelFactory(name="qwen2.5-7b-instruct")).model
    big = ModelRouteFactory(model=PublicModelFactory(name="qwen2.5-72b")).model
    PublicModelFactory(name="no-route-yet")
    bob.allowed_models.set([big])
    client.force_login(alice.user)
    page = client.get("/").content.decode()
    assert 'id="base-url">https://llm.example.org/v1<' in page
    assert re.findall(r'<code class="model">(.*?)</code>', page) == ["qwen2.5-72b", "qwen2.5-7b-instruct"]
    assert 'api_key="YOUR_API_KEY"' in page and "Bearer YOUR_API_KEY" in page
    client.force_login(bob.user)
    page = client.get("/").content.decode()
    assert re.findall(r'<code class="model">(.*?)</code>', page) == ["qwen2.5-72b"]
    assert small.name not in re.search(r'id="quick-start">(.*?)</section>', page, re.S).group(1)


def test_no_other_members_data_and_no_raw_key_on_the_page(client, lab):
    team, alice, bob = lab
    _, alice_raw = api_key_issue(member=alice, label="alice-laptop")
    api_key_issue(member=bob, label="bobs-label")
    quota_top_up(member=bob, tokens=5, reason="bobs-reason")
    client.force_login(alice.user)
    page = client.get("/").content.decode()
    assert "alice-laptop" in page and alice_raw not in page
    assert "bobs-label" not in page and "bobs-reason" not in page and ">bob<" not in page


@time_machine.travel(NOW, tick=False)
def test_home_query_count_does_not_grow_with_rows_keys_or_members(client, lab, django_assert_num_queries):
    team, alice, bob = lab
    client.force_login(alice.user)
    # session, user, memberships, quota counter, team counter, chart (past days, today), projection
    # (period, policy, usage, members, counters), keys, history, models; and where the rollups end
    # for the chart's past days and the projection
    with django_assert_num_queries(17):
        assert client.get("/").status_code == 200
    for n in range(30):
        usage(alice, NOV, started_at=datetime(2026, 11, 1 + n % 20, 8, tzinfo=SHANGHAI))
        usage(MemberJoinedFactory(team=team), NOV)
        api_key_issue(member=alice, label=f"k{n}")
    from django.core.cache import cache
    cache.clear()
    with django_assert_num_queries(18):  # and the past months
        assert client.get("/?months=6").status_code == 200
    # the past and the projection are cached: the next view reads only the live figures and today's rows
    with django_assert_num_queries(9):
        assert client.get("/?months=6").status_code == 200


@time_machine.travel(NOW, tick=False)
def test_todays_usage_shows_at_once_while_the_past_comes_from_the_cache(client, lab):
    _, alice, _ = lab
    client.force_login(alice.user)
    assert client.get("/").context["chart"].series[0].values[19] == 0
    usage(alice, NOV, prompt=123, completion=7, started_at=NOW - timedelta(hours=1))
    chart = client.get("/").context["chart"]
    assert (chart.series[0].values[19], chart.series[1].values[19]) == (123, 7)
    assert sum(chart.series[0].values) == 3123  # the cached past days are still there
    months = client.get("/?months=3").context["chart"]
    assert [s.values[-1] for s in months.series] == [3123, 1507]


@time_machine.travel(NOW, tick=False)
def test_a_team_without_a_monthly_cost_says_so(client, lab):
    team, alice, _ = lab
    team.monthly_cost = 0
    team.save(update_fields=["monthly_cost"])
    client.force_login(alice.user)
    assert "The team has no monthly cost to share." in client.get("/").content.decode()
