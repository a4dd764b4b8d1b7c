"""The close scenario's data generator at a tiny scale: realistic rows in SQL, then a clean close."""
import zoneinfo
from datetime import datetime, timedelta
from decimal import Decimal as D

import pytest
from django.db.models import Count, Sum

from bench import closedata
from billing.models import UsageRecord
from tenants.models import Member, QuotaCounter, TeamQuotaCounter
from tenants.periods import next_period_start

SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.mark.django_db
def test_tiny_month_closes_clean_and_a_second_close_changes_nothing():
    gen = closedata.generate(members=2, rows=1000, slug="tiny", vacuum=False)
    assert gen["rows"] == 1000
    out = closedata.close(slug="tiny")
    assert out["status"] == "closed" and out["invoices"] == 2
    assert out["reconciliation_ok"] and out["reconciliation_mismatches"] == 0
    assert out["tokens_match"] and out["usage_totals"][0] > 900  # ~97 % of the rows are answered
    assert out["lines_sum_to_invoices"] and D(out["cost_difference"]) == 0 and D(out["invoiced"]) == D("30000")
    assert out["second_close_new_invoices"] == 0 and out["second_close_unchanged"]
    assert out["second_close_queries"] < 5 < out["close_queries"]


@pytest.mark.django_db
def test_rows_fall_in_the_month_after_joining_with_realistic_statuses_and_matching_counters():
    gen = closedata.generate(members=10, rows=4000, slug="shape", vacuum=False)
    start = datetime.fromisoformat(gen["start"]).date()
    rows = UsageRecord.objects.filter(team_id=gen["team_id"])
    assert rows.count() == 4000 and set(rows.values_list("period_start", flat=True)) == {start}
    begin = datetime.combine(start, datetime.min.time(), tzinfo=SHANGHAI)
    end = datetime.combine(next_period_start(start), datetime.min.time(), tzinfo=SHANGHAI)
    assert not rows.filter(started_at__lt=begin).exists() and not rows.filter(started_at__gte=end).exists()
    days = {r.astimezone(SHANGHAI).day for r in rows.values_list("started_at", flat=True)}
    assert len(days) == (end - begin).days  # every day of the month has requests
    statuses = dict(rows.values_list("status").annotate(n=Count("id")))
    assert statuses["ok"] > 0.9 * 4000
    assert {"client_disconnected", "rejected", "upstream_error"} <= set(statuses)
    assert not rows.filter(status="rejected").exclude(total_tokens=0).exists()
    assert set(rows.values_list("model", flat=True)) == {m[0] for m in closedata.MODELS}
    members = list(Member.objects.filter(team_id=gen["team_id"]).order_by("pk"))
    per_member = dict(rows.values_list("member_id").annotate(n=Count("id")))
    assert len(per_member) == 10 and per_member[members[0].pk] > per_member[members[-1].pk]  # heavy users first
    late = members[-1]  # joined on the 6th (local): nothing before
    assert late.created_at == begin + timedelta(days=5)
    assert not rows.filter(member=late, started_at__lt=late.created_at).exists()
    for counter in QuotaCounter.objects.filter(member__team_id=gen["team_id"], period_start=start):
        mine = rows.filter(member_id=counter.member_id)
        charged = mine.filter(status__in=["ok", "client_disconnected"]).count() + mine.exclude(
            status__in=["ok", "client_disconnected"]).exclude(total_tokens=0).count()
        assert (counter.requests_used, counter.tokens_used) == (charged, mine.aggregate(t=Sum("total_tokens"))["t"])
        assert counter.request_limit is None or counter.requests_used <= counter.request_limit
        assert counter.token_limit is None or counter.tokens_used <= counter.token_limit
    team_counter = TeamQuotaCounter.objects.get(team_id=gen["team_id"], period_start=start)
    assert team_counter.tokens_used == rows.aggregate(t=Sum("total_tokens"))["t"] <= team_counter.token_limit
