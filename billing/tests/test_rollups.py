"""Daily rollups: usage_by_day reads them for settled days and gives exactly what the rows give."""
import random
import zoneinfo
from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest
from django.conf import settings

from billing.models import UsageDay, UsageDayRollup
from billing.policies import PolicyParams
from billing.reports import _usage_days_of_rows, usage_by_day
from billing.selectors import period_split, period_usage
from billing.services.rollups import AGAIN_DAYS, MAX_DAYS, usage_days_roll, usage_days_settled_until
from billing.tasks import usage_days_roll_task
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.models import Team
from tenants.services.reservations import reservation_max_age
from tenants.tests.factories import TeamFactory

pytestmark = pytest.mark.django_db
SH = zoneinfo.ZoneInfo("Asia/Shanghai")
OCT, NOV, DEC = date(2026, 10, 1), date(2026, 11, 1), date(2026, 12, 1)
STATUSES = ["ok", "ok", "ok", "client_disconnected", "rejected", "upstream_error", "client_error"]


def _raw(team, since, until, member=None, by=None):
    return _usage_days_of_rows(team, since, until, member, by)


@pytest.fixture
def busy():
    """Three members, two models, Oct 25 – Nov 10 in Shanghai, rows near every midnight, every status."""
    team = TeamFactory(timezone="Asia/Shanghai")
    members = [MemberJoinedFactory(team=team) for _ in range(3)]
    rng = random.Random(7)
    for n in range(300):
        when = datetime(2026, 10, 25, tzinfo=SH) + timedelta(minutes=rng.randrange(17 * 24 * 60))
        if n % 10 == 0:  # right around a midnight
            when = when.replace(hour=0, minute=0) + timedelta(seconds=rng.choice([-1, 0, 1]))
        month = OCT if when.astimezone(SH).month == 10 else NOV
        usage(rng.choice(members), month, prompt=rng.randrange(1, 500), completion=rng.randrange(0, 300),
              model=rng.choice(["qwen2.5-7b-instruct", "bge-m3"]), status=rng.choice(STATUSES), started_at=when)
    return team, members


def test_rolled_days_give_exactly_what_the_rows_give(busy, django_assert_max_num_queries):
    team, members = busy
    now = datetime(2026, 11, 8, 12, tzinfo=SH)
    assert usage_days_roll(team=team, now=now) == (date(2026, 11, 8) - OCT).days + 1  # from the day before
    assert UsageDayRollup.objects.get(team=team).until == date(2026, 11, 8)
    assert UsageDay.objects.filter(team=team).exists()
    rng = random.Random(11)
    for _ in range(60):
        since = date(2026, 10, 20) + timedelta(days=rng.randrange(20))
        until = since + timedelta(days=rng.randrange(1, 25))
        by = rng.choice([None, "member", "model"])
        member = rng.choice([None, *members])
        with django_assert_max_num_queries(3):
            got = usage_by_day(team=team, since=since, until=until, member=member, by=by)
        assert got == _raw(team, since, until, member, by), (since, until, by, member)
    # every counted row is in exactly one rollup
    whole = usage_by_day(team=team, since=OCT, until=DEC)
    assert sum(d.requests for d in whole) == team_rows_counted(team)


def team_rows_counted(team):
    from billing.models import UsageRecord
    from billing.selectors import BILLED_STATUSES

    return UsageRecord.objects.filter(team=team, status__in=BILLED_STATUSES).count()


def test_the_month_so_far_from_rollups_is_what_the_close_reads_from_the_rows(busy):
    team, members = busy
    # admitted a moment after midnight, begun a moment before it: October's day, November's bill
    usage(members[2], NOV, prompt=4321, completion=1, started_at=datetime(2026, 11, 1, tzinfo=SH) - timedelta(
        milliseconds=300))
    for now in (datetime(2026, 10, 31, 12, tzinfo=SH), datetime(2026, 11, 1, 12, tzinfo=SH),
                datetime(2026, 11, 2, 12, tzinfo=SH), datetime(2026, 11, 12, tzinfo=SH)):
        usage_days_roll(team=team, now=now)
        for start in (OCT, NOV):
            rows = [dict(r) for r in period_usage(team=team, start=start)]
            assert [dict(r) for r in period_usage(team=team, start=start, rolled=True)] == rows, (now, start)
    assert any(r["prompt_tokens"] >= 4321 for r in period_usage(team=team, start=NOV, rolled=True)
               if r["member_id"] == members[2].pk)
    cost = Decimal("300.00")
    params = PolicyParams()
    assert period_split(team=team, start=NOV, cost=cost, params=params, rolled=True)[1] == \
        period_split(team=team, start=NOV, cost=cost, params=params)[1]


def test_a_day_is_rolled_only_once_no_request_can_still_write_to_it(busy):
    team, members = busy
    bound = timedelta(seconds=reservation_max_age())
    end_of_nov_5 = datetime(2026, 11, 6, tzinfo=SH)
    assert usage_days_settled_until(team=team, now=end_of_nov_5 + bound - timedelta(seconds=1)) == date(2026, 11, 5)
    usage_days_roll(team=team, now=end_of_nov_5 + bound - timedelta(seconds=1))
    assert UsageDayRollup.objects.get(team=team).until == date(2026, 11, 5)
    # a request that began a second before midnight settles within the bound: its row is still read
    late = usage(members[0], NOV, prompt=1000, completion=0, started_at=end_of_nov_5 - timedelta(seconds=1))
    day = usage_by_day(team=team, since=date(2026, 11, 5), until=date(2026, 11, 6), member=members[0])
    assert day == _raw(team, date(2026, 11, 5), date(2026, 11, 6), members[0]) and day[0].prompt_tokens >= 1000
    usage_days_roll(team=team, now=end_of_nov_5 + bound)
    assert UsageDayRollup.objects.get(team=team).until == date(2026, 11, 6)
    rolled = UsageDay.objects.filter(team=team, member=members[0], day=date(2026, 11, 5))
    assert sum(r.prompt_tokens for r in rolled) == day[0].prompt_tokens  # the late row is in the rollup
    assert rolled.filter(model=late.model).exists()
    assert usage_by_day(team=team, since=date(2026, 11, 5), until=date(2026, 11, 6), member=members[0]) == day


def test_rolling_again_is_idempotent_and_catches_a_row_written_late(busy):
    team, members = busy
    now = datetime(2026, 11, 9, 12, tzinfo=SH)
    usage_days_roll(team=team, now=now)
    before = list(UsageDay.objects.filter(team=team).order_by("day", "member", "model").values())
    assert usage_days_roll(team=team, now=now) == AGAIN_DAYS  # the last days again, nothing else
    after = list(UsageDay.objects.filter(team=team).order_by("day", "member", "model").values())
    assert [{k: v for k, v in r.items() if k != "id"} for r in before] == \
           [{k: v for k, v in r.items() if k != "id"} for r in after]
    # a gateway that waited for its database writes yesterday's row late: the next run has it
    usage(members[1], NOV, prompt=777, completion=0, started_at=datetime(2026, 11, 8, 9, tzinfo=SH))
    usage_days_roll(team=team, now=now + timedelta(minutes=10))
    assert usage_by_day(team=team, since=date(2026, 11, 8), until=date(2026, 11, 9), member=members[1]) == \
        _raw(team, date(2026, 11, 8), date(2026, 11, 9), members[1])


def test_a_new_time_zone_reads_the_rows_until_the_days_are_rolled_again(busy):
    team, members = busy
    now = datetime(2026, 11, 9, 12, tzinfo=SH)
    usage_days_roll(team=team, now=now)
    Team.objects.filter(pk=team.pk).update(timezone="Europe/Paris")
    team.refresh_from_db()
    span = (date(2026, 10, 26), date(2026, 11, 7))
    # the rollups are of Shanghai's days: not read for Paris's
    assert usage_by_day(team=team, since=span[0], until=span[1], by="member") == _raw(team, *span, by="member")
    usage_days_roll(team=team, now=now)
    state = UsageDayRollup.objects.get(team=team)
    assert state.timezone == "Europe/Paris" and state.until == date(2026, 11, 9)
    assert usage_by_day(team=team, since=span[0], until=span[1], by="model") == _raw(team, *span, by="model")


def test_the_first_run_on_a_long_history_is_bounded_and_the_next_ones_go_on(busy):
    team, members = busy
    now = datetime(2027, 6, 1, tzinfo=SH)  # months later: more days than one run takes
    assert usage_days_roll(team=team, now=now) == MAX_DAYS
    assert UsageDayRollup.objects.get(team=team).until == OCT - timedelta(days=1) + timedelta(days=MAX_DAYS)
    usage_days_roll(team=team, now=now)
    assert UsageDayRollup.objects.get(team=team).until == OCT - timedelta(days=1 - 2 * MAX_DAYS + AGAIN_DAYS)
    assert usage_by_day(team=team, since=OCT, until=DEC, by="member") == _raw(team, OCT, DEC, by="member")


def test_a_team_without_usage_is_left_alone_and_the_task_rolls_every_team(busy):
    team, _ = busy
    empty = TeamFactory()
    assert usage_days_roll(team=empty) == 0 and not UsageDayRollup.objects.filter(team=empty).exists()
    assert usage_days_roll_task() >= (usage_days_settled_until(team=team) - OCT).days
    assert UsageDayRollup.objects.filter(team=team).exists()


def test_the_schedule_rolls_every_ten_minutes():
    entry = settings.CELERY_BEAT_SCHEDULE["billing-usage-days-roll"]
    assert entry["task"] == "billing.tasks.usage_days_roll_task"
    assert len(entry["schedule"].minute) == 6 and entry["options"]["expires"] < 600
