"""The `pages` scenario's Django side: this month's usage generated in SQL, then the dashboards timed on it.

    python -m bench.pagesdata generate '{"members": 50, "rows": 1000000}'
    python -m bench.pagesdata render '{"team": "pages-bench", "repeat": 5}'

``generate`` is the close scenario's generator (bench.closedata) pointed at the team's
current month, the rows spread over all its days. ``render`` looks at it as on the month's
last day at 18:00 in the team's time zone (time-machine moves this process's clock there),
so the rows fill the month as a busy month's would by then. It signs in as the team's first
admin and as its heaviest member with quotas and renders the team page (/team/) and the
member page (/) through Django's test client in this process (the HTTP server's own share is
the gateway scenarios' business). First it rolls the past days up, as the schedule has by then
(billing.services.rollups; timed apart, it is background work). Then each page once cold (an empty cache: the month's split and
past days are cached, dashboards.cache), then `repeat` times warm, reporting the cold time,
the median and slowest warm times and the number of SQL statements of each render.
"""
from __future__ import annotations

import statistics
import sys
import time

TEAM_SLUG = "pages-bench"


def generate(*, members: int = 50, rows: int = 1_000_000, slug: str = TEAM_SLUG, vacuum: bool = True) -> dict:
    from bench import closedata
    from tenants.periods import period_start_for

    return closedata.generate(members=members, rows=rows, slug=slug, vacuum=vacuum,
                              start=period_start_for(closedata.TZ))


def _timed(client, path: str, repeat: int) -> dict:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from django.core.cache import cache

    cache.clear()
    with CaptureQueriesContext(connection) as captured:
        t0 = time.perf_counter()
        first = client.get(path, secure=True)  # production settings redirect plain HTTP
        cold = time.perf_counter() - t0
    if first.status_code != 200:
        raise SystemExit(f"{path} answered {first.status_code}")
    cold_queries = len(captured.captured_queries)
    walls, queries = [], []
    for _ in range(repeat):
        with CaptureQueriesContext(connection) as captured:
            t0 = time.perf_counter()
            response = client.get(path, secure=True)
            walls.append(time.perf_counter() - t0)
        assert response.status_code == 200
        queries.append(len(captured.captured_queries))
    return {"cold_s": cold, "cold_queries": cold_queries, "median_s": statistics.median(walls), "max_s": max(walls),
            "queries": max(queries), "bytes": len(response.content)}


def render(*, slug: str = TEAM_SLUG, repeat: int = 5) -> dict:
    import zoneinfo
    from datetime import datetime, timedelta

    import time_machine

    from tenants.models import Member
    from tenants.periods import next_period_start, period_start_for

    tz = zoneinfo.ZoneInfo(Member.objects.filter(team__slug=slug).values_list("team__timezone", flat=True)[0])
    last_day = next_period_start(period_start_for(tz.key)) - timedelta(days=1)
    with time_machine.travel(datetime.combine(last_day, datetime.min.time(), tzinfo=tz) + timedelta(hours=18)):
        return {**_roll_up(slug), **_render(slug, repeat)}


def _roll_up(slug: str) -> dict:
    """What the schedule has done by then (billing-usage-days-roll): the month's past days rolled up."""
    from billing.services.rollups import usage_days_roll
    from tenants.models import Team

    t0 = time.perf_counter()
    days = usage_days_roll(team=Team.objects.get(slug=slug))
    return {"rollup_days": days, "rollup_s": time.perf_counter() - t0}


def _render(slug: str, repeat: int) -> dict:
    from django.conf import settings
    from django.test import Client

    from tenants.models import Member

    settings.ALLOWED_HOSTS = ["*"]
    admin = Member.objects.filter(team__slug=slug, role=Member.Role.ADMIN).select_related("user").order_by("pk")[0]
    heavy = (Member.objects.filter(team__slug=slug, role=Member.Role.MEMBER).select_related("user")
             .order_by("pk")[0])  # the member weights fall with the index: the first one is the heaviest
    admin_client, member_client = Client(), Client()
    admin_client.force_login(admin.user)
    member_client.force_login(heavy.user)
    return {"team": _timed(admin_client, "/team/", repeat), "member": _timed(member_client, "/", repeat),
            "member_username": heavy.user.get_username()}


def main(argv: list[str]) -> int:
    from bench.procs import django_json_main

    return django_json_main("bench.pagesdata", argv, {
        "generate": lambda spec: generate(members=spec.get("members", 50), rows=spec.get("rows", 1_000_000),
                                          slug=spec.get("team", TEAM_SLUG)),
        "render": lambda spec: render(slug=spec.get("team", TEAM_SLUG), repeat=spec.get("repeat", 5)),
    })


if __name__ == "__main__":
    sys.exit(main(sys.argv))
