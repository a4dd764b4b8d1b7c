"""Usage as the pages read it: days in the team's time zone, only counted statuses, lists newest first."""
import zoneinfo
from datetime import date, datetime

import pytest

from billing.reports import member_projection, months_back, usage_by_day, usage_rows
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.tests.factories import TeamFactory

pytestmark = pytest.mark.django_db
SH = zoneinfo.ZoneInfo("Asia/Shanghai")
NOV = date(2026, 11, 1)


@pytest.fixture
def team():
    return TeamFactory(timezone="Asia/Shanghai", monthly_cost="300.00", currency="CNY")


def test_days_are_the_teams_days_and_only_counted_statuses_add_up(team):
    alice, bob = MemberJoinedFactory(team=team), MemberJoinedFactory(team=team)
    # 23:30 in Shanghai on the 3rd is 15:30 UTC the same day; 00:30 on the 4th is 16:30 UTC on the 3rd.
    usage(alice, NOV, prompt=10, completion=5, started_at=datetime(2026, 11, 3, 23, 30, tzinfo=SH))
    usage(alice, NOV, prompt=20, completion=7, started_at=datetime(2026, 11, 4, 0, 30, tzinfo=SH))
    usage(alice, NOV, prompt=999, completion=0, status="rejected", started_at=datetime(2026, 11, 4, 1, tzinfo=SH))
    usage(bob, NOV, prompt=1, completion=1, model="other", started_at=datetime(2026, 11, 4, 2, tzinfo=SH))

    whole = usage_by_day(team=team, since=NOV, until=date(2026, 12, 1))
    assert [(d.day, d.requests, d.prompt_tokens, d.completion_tokens) for d in whole] == [
        (date(2026, 11, 3), 1, 10, 5), (date(2026, 11, 4), 2, 21, 8)]
    mine = usage_by_day(team=team, since=NOV, until=date(2026, 12, 1), member=alice, by="model")
    assert [(d.day, d.key, d.tokens) for d in mine] == [(date(2026, 11, 3), "qwen2.5-7b-instruct", 15),
                                                        (date(2026, 11, 4), "qwen2.5-7b-instruct", 27)]
    by_member = usage_by_day(team=team, since=date(2026, 11, 4), until=date(2026, 11, 5), by="member")
    assert {(d.key, d.tokens) for d in by_member} == {(alice.pk, 27), (bob.pk, 2)}


def test_lists_show_every_status_newest_first_and_filter(team):
    alice = MemberJoinedFactory(team=team)
    old = usage(alice, NOV, started_at=datetime(2026, 11, 2, 9, tzinfo=SH))
    new = usage(alice, NOV, status="rejected", started_at=datetime(2026, 11, 20, 9, tzinfo=SH))
    assert list(usage_rows(team=team, member=alice)) == [new, old]
    assert list(usage_rows(team=team, member=alice, status="ok")) == [old]
    assert list(usage_rows(team=team, since=date(2026, 11, 3))) == [new]
    assert list(usage_rows(team=team, until=date(2026, 11, 3))) == [old]
    assert list(usage_rows(team=team, model="nope")) == []


def test_months_back_counts_this_month(team):
    now = datetime(2026, 3, 10, tzinfo=SH)
    assert months_back(team, 1, now) == (date(2026, 3, 1), date(2026, 4, 1))
    assert months_back(team, 6, now) == (date(2025, 10, 1), date(2026, 4, 1))


def test_projection_is_the_closes_split(team):
    alice, bob = MemberJoinedFactory(team=team), MemberJoinedFactory(team=team)
    now = datetime(2026, 11, 20, tzinfo=SH)
    usage(alice, NOV, prompt=200, completion=100)
    usage(bob, NOV, prompt=50, completion=50)
    mine = member_projection(member=alice, now=now)
    assert mine.row.amount + member_projection(member=bob, now=now).row.amount == mine.report.cost
    assert mine.row.amount == pytest.approx(225)  # 300 tokens of 400
