"""The `close` scenario's Django side: a month of usage generated in SQL, and period_close timed on it.

Run by the bench process in subprocesses with the bench env (it never opens the bench
database itself):

    python -m bench.closedata generate '{"members": 50, "rows": 1000000}'
    python -m bench.closedata close '{"team": "close-bench", "start": "2026-11-01"}'

Each prints one JSON line. ``generate`` creates, through the services, a team in
Asia/Shanghai (CNY, a monthly cost, a team token cap, a usage policy with model weights and
public prices) with members who have quotas and one API key each, then writes last month's
usage rows with ONE ``INSERT … SELECT … FROM generate_series`` and the month's quota counters
with two more statements (what the gateway's settlements would have left in them). The
"random" values are hashes of the row number (``hashint8extended``), so the data are the
same on every run. ``close`` times ``billing.services.period_close`` for that month, checks
the invoices against the cost and the usage rows, and times a second close.

The tests (bench/tests/test_closedata.py) call ``generate`` and ``close`` at a tiny scale.
"""
from __future__ import annotations

import math
import sys
import time
from datetime import date, datetime, timedelta
from decimal import Decimal

TEAM_SLUG = "close-bench"
TZ = "Asia/Shanghai"
MONTHLY_COST = "30000.00"
# (public name, share of requests, upstream, ms per generated token)
MODELS = (
    ("qwen2.5-7b-instruct", 0.60, "vllm-7b", 15),
    ("qwen2.5-coder-32b-instruct", 0.15, "vllm-coder-32b", 25),
    ("qwen2.5-72b-instruct", 0.25, "vllm-72b", 40),
)
# (status, HTTP status, share of requests): mostly answered, some clients gone, refusals, upstream failures
STATUSES = (
    ("ok", 200, 0.940),
    ("client_disconnected", 499, 0.030),
    ("rejected", 429, 0.020),
    ("upstream_error", 502, 0.005),
    ("upstream_unavailable", 503, 0.003),
    ("upstream_timeout", 504, 0.002),
)
# Prompt tokens log-uniform in [20, 6000), completion budget log-uniform in [8, 1024): ~1,250 tokens a request.
PROMPT_MIN, PROMPT_RATIO = 20, 300
COMPLETION_MIN, COMPLETION_RATIO = 8, 128
MEAN_TOKENS = (PROMPT_MIN * (PROMPT_RATIO - 1) / math.log(PROMPT_RATIO)
               + COMPLETION_MIN * (COMPLETION_RATIO - 1) / math.log(COMPLETION_RATIO))
UNLIMITED_ADMINS = 2  # the first members: admins without quotas


def _u(i: int) -> str:
    """A uniform number in [0, 1) from the row number g: the 48 low bits of a seeded hash (deterministic)."""
    return f"((hashint8extended(g::bigint, {i}) & 281474976710655)::float8 / 281474976710656.0)"


def _cumulative(shares) -> list[float]:
    """Thresholds for width_bucket(u, thresholds) + 1 = a 1-based index drawn with these shares."""
    shares = list(shares)
    total, out, acc = sum(shares), [], 0.0
    for share in shares[:-1]:
        acc += share
        out.append(acc / total)
    return out


def member_weights(n: int) -> list[float]:
    """A few heavy users and a long tail (Zipf-like): member i gets 1/(i+5) of the weight."""
    return [1 / (i + 5) for i in range(n)]


def late_joiners(n: int) -> dict[int, int]:
    """The last tenth of the members joined during the month: member index → day offset of joining."""
    late = max(0, n // 10)
    return {i: 5 * (k + 1) for k, i in enumerate(range(n - late, n))}


def _nice_up(x: float) -> int:
    """Round up to 1, 2 or 5 × a power of ten (a quota an admin would type)."""
    if x <= 1:
        return 1
    p = 10 ** math.floor(math.log10(x))
    return next(m * p for m in (1, 2, 5, 10) if m * p >= x)


USAGE_SQL = """
INSERT INTO {usage} (request_id, team_id, member_id, api_key_id, period_start, endpoint, model, upstream,
                     prompt_tokens, completion_tokens, total_tokens, cached_tokens, status, http_status, stream,
                     started_at, ttft_ms, duration_ms)
SELECT 'req_' || lpad(to_hex(%(team)s::int), 6, '0') || lpad(to_hex(g), 8, '0') || substr(md5(g::text), 1, 18),
       %(team)s, (%(members)s::bigint[])[m], (%(keys)s::bigint[])[m], %(start)s::date,
       CASE WHEN {u_endpoint} < 0.9 THEN 'chat' ELSE 'completions' END,
       (%(models)s::text[])[k], CASE WHEN s = 3 THEN '' ELSE (%(upstreams)s::text[])[k] END,
       prompt, completion, prompt + completion,
       CASE WHEN prompt > 0 AND {u_cache} < 0.3 THEN floor(prompt * 0.8 * {u_cached})::bigint ELSE 0 END,
       (%(statuses)s::text[])[s], (%(http)s::int[])[s], stream,
       ((%(start)s::date + day)::timestamp + make_interval(secs => tod)) AT TIME ZONE %(tz)s,
       CASE WHEN stream AND s IN (1, 2, 4) THEN ttft END,
       CASE s WHEN 3 THEN 1 + 2 * {u_fast}
              WHEN 5 THEN 3 + 5 * {u_fast}
              WHEN 6 THEN %(timeout_ms)s
              ELSE ttft + completion * (%(itl)s::float8[])[k] END
  FROM generate_series(1, %(rows)s) AS g
 CROSS JOIN LATERAL (
       SELECT width_bucket({u_member}, %(member_cum)s::float8[]) + 1 AS m,
              width_bucket({u_model}, %(model_cum)s::float8[]) + 1 AS k,
              width_bucket({u_status}, %(status_cum)s::float8[]) + 1 AS s,
              {u_stream} < 0.6 AS stream) AS a
 CROSS JOIN LATERAL (
       SELECT (%(first_day)s::int[])[m] + floor({u_day} * (%(days)s - (%(first_day)s::int[])[m]))::int AS day,
              -- 70 %% of the requests in working hours (09:00-19:00 local), the rest at any time
              CASE WHEN {u_busy} < 0.7 THEN 32400 + 36000 * {u_tod} ELSE 86400 * {u_tod} END AS tod,
              40 + 400 * {u_ttft} AS ttft,
              floor(%(pmin)s * exp({u_prompt} * ln(%(pratio)s)))::bigint AS p0,
              floor(%(cmin)s * exp({u_completion} * ln(%(cratio)s)))::bigint AS c0) AS b
 CROSS JOIN LATERAL (
       -- answered: all tokens; a client gone or a stream broken by the upstream: part of the completion;
       -- refused and failed requests: none
       SELECT CASE WHEN s IN (1, 2) OR (s = 4 AND stream) THEN p0 ELSE 0 END AS prompt,
              CASE WHEN s = 1 THEN c0
                   WHEN s = 2 OR (s = 4 AND stream) THEN floor(c0 * {u_cut})::bigint
                   ELSE 0 END AS completion) AS c
 -- the rows land in time order, as the gateway writes them (the table's physical order follows)
 ORDER BY 16
""".format(
    usage="billing_usagerecord",
    u_member=_u(1), u_model=_u(2), u_status=_u(3), u_stream=_u(4), u_day=_u(5), u_busy=_u(6), u_tod=_u(7),
    u_ttft=_u(8), u_prompt=_u(9), u_completion=_u(10), u_cut=_u(11), u_cache=_u(12), u_cached=_u(13),
    u_fast=_u(14), u_endpoint=_u(15),
)

# The month's counters as the settlements left them: charged requests (answered, or with tokens) and tokens.
COUNTERS_SQL = """
INSERT INTO billing_quotacounter (member_id, period_start, request_limit, token_limit,
                                  requests_used, requests_reserved, tokens_used, tokens_reserved)
SELECT m.id, %(start)s::date, m.request_quota, m.token_quota,
       count(u.id) FILTER (WHERE u.status IN ('ok', 'client_disconnected') OR u.total_tokens > 0), 0,
       coalesce(sum(u.total_tokens), 0), 0
  FROM tenants_member m
  LEFT JOIN billing_usagerecord u ON u.member_id = m.id AND u.period_start = %(start)s::date
 WHERE m.team_id = %(team)s
 GROUP BY m.id
"""
TEAM_COUNTER_SQL = """
INSERT INTO billing_teamquotacounter (team_id, period_start, token_limit, tokens_used, tokens_reserved)
SELECT %(team)s, %(start)s::date, %(cap)s, coalesce(sum(total_tokens), 0), 0
  FROM billing_usagerecord WHERE team_id = %(team)s AND period_start = %(start)s::date
"""


def last_month(tz: str = TZ, now: datetime | None = None) -> date:
    from tenants.periods import period_start_for

    this = period_start_for(tz, now)
    return (this - timedelta(days=1)).replace(day=1)


def generate(*, members: int = 50, rows: int = 1_000_000, slug: str = TEAM_SLUG, vacuum: bool = True,
             start: date | None = None, days: int | None = None) -> dict:
    """The team, its members (quotas, keys), a month's usage rows and counters; timings in seconds.

    The month is last month unless `start` says otherwise; the rows fall in its first `days`
    days (the whole month by default: the pages scenario passes the days of this month so far).
    """
    import zoneinfo

    from django.db import connection

    from billing.services import billing_policy_update
    from tenants.models import Member
    from tenants.periods import next_period_start
    from tenants.services import api_key_issue, member_add, team_create

    t0 = time.perf_counter()
    start = start or last_month()
    days = days or (next_period_start(start) - start).days
    weights = member_weights(members)
    expected_rows = [rows * w / sum(weights) for w in weights]
    expected_tokens = rows * MEAN_TOKENS
    team = team_create(slug=slug, name="Close benchmark", timezone_name=TZ, currency="CNY",
                       monthly_cost=MONTHLY_COST, token_cap=_nice_up(2 * expected_tokens))
    late = late_joiners(members) if days >= 28 else {}  # a month so far of a few days: nobody joined late
    tz = zoneinfo.ZoneInfo(TZ)
    member_ids, key_ids, first_day = [], [], []
    for i in range(members):
        unlimited = i < UNLIMITED_ADMINS
        share = expected_rows[i] * days / (days - late.get(i, 0))  # a late joiner's rows fall in fewer days
        member = member_add(team=team, username=f"{slug}-{i + 1:03d}",
                            role=Member.Role.ADMIN if unlimited else Member.Role.MEMBER,
                            request_quota=None if unlimited else max(100, _nice_up(2 * share)),
                            token_quota=None if unlimited else max(100_000, _nice_up(2 * share * MEAN_TOKENS)))
        key, _ = api_key_issue(member=member, label="laptop")
        joined = datetime.combine(start + timedelta(days=late.get(i, 0)), datetime.min.time(), tzinfo=tz)
        if i not in late:
            joined -= timedelta(days=90)
        Member.objects.filter(pk=member.pk).update(created_at=joined)
        member_ids.append(member.pk)
        key_ids.append(key.pk)
        first_day.append(late.get(i, 0))
    billing_policy_update(team=team, kind="usage", completion_weight=Decimal(2),
                          model_weights={MODELS[1][0]: "2", MODELS[2][0]: "4"},
                          public_prices={MODELS[0][0]: {"prompt": "0.5", "completion": "1"},
                                         MODELS[1][0]: {"prompt": "1", "completion": "2"},
                                         MODELS[2][0]: {"prompt": "4", "completion": "12"}})
    setup_s = time.perf_counter() - t0

    params = {
        "team": team.pk, "start": start, "tz": TZ, "rows": rows, "days": days,
        "members": member_ids, "keys": key_ids, "first_day": first_day,
        "member_cum": _cumulative(weights),
        "models": [m[0] for m in MODELS], "upstreams": [m[2] for m in MODELS], "itl": [float(m[3]) for m in MODELS],
        "model_cum": _cumulative(m[1] for m in MODELS),
        "statuses": [s[0] for s in STATUSES], "http": [s[1] for s in STATUSES],
        "status_cum": _cumulative(s[2] for s in STATUSES),
        "timeout_ms": 600_000.0, "pmin": PROMPT_MIN, "pratio": PROMPT_RATIO, "cmin": COMPLETION_MIN,
        "cratio": COMPLETION_RATIO, "cap": team.token_cap,
    }
    with connection.cursor() as cursor:
        t1 = time.perf_counter()
        cursor.execute(USAGE_SQL, params)
        inserted = cursor.rowcount
        insert_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        cursor.execute(COUNTERS_SQL, params)
        cursor.execute(TEAM_COUNTER_SQL, params)
        counters_s = time.perf_counter() - t2
        vacuum_s = None
        if vacuum:
            # This server runs without autovacuum: give the table what production's autovacuum would
            # (statistics, hint bits, the visibility map) before the close reads it.
            t3 = time.perf_counter()
            cursor.execute("VACUUM (ANALYZE)")
            vacuum_s = time.perf_counter() - t3
        cursor.execute("SELECT pg_total_relation_size('billing_usagerecord')")
        table_bytes = cursor.fetchone()[0]
    return {"team": slug, "team_id": team.pk, "start": start.isoformat(), "members": members, "rows": inserted,
            "setup_s": setup_s, "insert_s": insert_s, "counters_s": counters_s, "vacuum_analyze_s": vacuum_s,
            "table_mb": table_bytes / 2**20}


def _timed_close(team, start: date):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from billing.services import period_close

    with CaptureQueriesContext(connection) as queries:
        t0 = time.perf_counter()
        period = period_close(team=team, start=start, wait_seconds=0)
        wall = time.perf_counter() - t0
    captured = queries.captured_queries
    sql_s = sum(float(q["time"]) for q in captured)
    slowest = sorted(captured, key=lambda q: float(q["time"]), reverse=True)[:3]
    return (period, wall, len(captured), sql_s, [{"s": float(q["time"]), "sql": q["sql"][:300]} for q in slowest],
            statement_kinds(captured))


def statement_kinds(captured) -> dict[str, int]:
    """How many statements of each kind ran: the verb and the first table named, e.g. "INSERT billing_invoice"."""
    import re

    kinds: dict[str, int] = {}
    for q in captured:
        sql = q["sql"].strip()
        verb = sql.split(None, 1)[0].upper() if sql else "?"
        table = re.search(r'(?:FROM|INTO|UPDATE)\s+"?(\w+)"?', sql, re.IGNORECASE)
        key = f"{verb} {table.group(1)}" if table else verb
        kinds[key] = kinds.get(key, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def close(*, slug: str = TEAM_SLUG, start: date | None = None) -> dict:
    """period_close of the team's month, timed (wall, SQL statements), checked, then a second close."""
    from django.db import connection
    from django.db.models import Count, Sum

    from billing.models import Invoice, InvoiceLine
    from billing.selectors import BILLED_STATUSES, period_reconciliation
    from tenants.models import Team

    team = Team.objects.get(slug=slug)
    start = start or last_month(team.timezone)
    period, close_s, close_queries, close_sql_s, slowest, kinds = _timed_close(team, start)

    invoices = list(Invoice.objects.filter(period=period).order_by("member_id"))
    invoiced = sum((i.amount for i in invoices), Decimal(0))
    line_sums = dict(InvoiceLine.objects.filter(invoice__period=period).values_list("invoice_id")
                     .annotate(total=Sum("amount")))
    lines_match = all(line_sums.get(i.pk, Decimal(0)) == i.amount for i in invoices)
    rec = period_reconciliation(period=period)
    # The same totals straight from the tables, not through billing's selectors.
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) "
                       "FROM billing_usagerecord WHERE team_id = %s AND period_start = %s AND status = ANY(%s)",
                       [team.pk, start, list(BILLED_STATUSES)])
        usage_totals = tuple(int(x) for x in cursor.fetchone())
        cursor.execute("SELECT status, count(*) FROM billing_usagerecord WHERE team_id = %s AND period_start = %s "
                       "GROUP BY status ORDER BY status", [team.pk, start])
        statuses = dict(cursor.fetchall())
    line_totals = InvoiceLine.objects.filter(invoice__period=period, kind=InvoiceLine.Kind.USAGE).aggregate(
        requests=Sum("requests"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
    invoiced_totals = tuple(int(line_totals[k] or 0) for k in ("requests", "prompt", "completion"))

    again, second_s, second_queries, _, _, _ = _timed_close(team, start)
    after = Invoice.objects.filter(period=period).aggregate(n=Count("id"))["n"]
    return {
        "team": slug, "start": start.isoformat(), "status": period.status, "cost": str(period.cost),
        "close_s": close_s, "close_queries": close_queries, "close_sql_s": close_sql_s, "slowest": slowest,
        "statement_kinds": kinds,
        "invoices": len(invoices), "invoiced": str(invoiced), "cost_difference": str(abs(invoiced - period.cost)),
        "unallocated": str(period.unallocated), "lines_sum_to_invoices": lines_match,
        "reconciliation_ok": rec.ok, "reconciliation_mismatches": len(rec.mismatches),
        "usage_totals": usage_totals, "invoiced_totals": invoiced_totals,
        "tokens_match": usage_totals == invoiced_totals, "statuses": statuses,
        "second_close_s": second_s, "second_close_queries": second_queries,
        "second_close_new_invoices": after - len(invoices),
        "second_close_unchanged": again.pk == period.pk and again.closed_at == period.closed_at,
    }


def main(argv: list[str]) -> int:
    from bench.procs import django_json_main

    return django_json_main("bench.closedata", argv, {
        "generate": lambda spec: generate(members=spec.get("members", 50), rows=spec.get("rows", 1_000_000),
                                          slug=spec.get("team", TEAM_SLUG)),
        "close": lambda spec: close(slug=spec.get("team", TEAM_SLUG),
                                    start=date.fromisoformat(spec["start"]) if spec.get("start") else None),
    })


if __name__ == "__main__":
    sys.exit(main(sys.argv))
