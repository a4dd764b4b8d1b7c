"""The benchmark's scenarios. Add one with ``@scenario(...)``; it gets a ``Bench`` and returns Results.

Simulator configurations (one simulator process each, started only if a selected
scenario needs it) are declared with ``sim_group``; the gateway reaches each as the
model ``bench-<group>`` (public name = served name, so direct and gateway requests
carry the same body).
"""
from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp

from bench.loadgen import percentile, run_load
from bench.figures import Result, Target
from bench.procs import BenchDatabase, django_json
from bench.runner import CHAT, Bench, _run, chat_body, scenario, sim_group
from proxy.simulator.testing import parse_metrics

INSTANT = sim_group("instant", "--max-num-seqs", "256", max_concurrency=256)
GPU = sim_group("gpu", "--ttft-ms", "100", "--itl-ms", "20", "--max-num-seqs", "64", max_concurrency=64)
# Real requests differ in length, so a real GPU frees its slots at different moments; without
# jitter every request of the flood lasts exactly as long and slots free up in synchronised
# bursts of 8, the worst case for a newcomer (it waits up to a whole request for the next burst).
FAIR = sim_group("fair", "--ttft-ms", "100", "--itl-ms", "20", "--max-num-seqs", "8", "--jitter", "0.2",
                 "--seed", "7", max_concurrency=8)

STATEMENTS = Target("PostgreSQL statements per request (request path)", "path_statements_per_request", "<=", 2)


@scenario("overhead", sims=("instant",),
          help="instant upstream, 16 tokens, non-streamed and streamed, concurrency 1/16/64")
def overhead(b: Bench) -> list[Result]:
    timing = b.timing()
    results = []
    for stream in (False, True):
        for c in (1, 16, 64):
            kind = "stream" if stream else "json"
            r = b.compare("overhead", f"16 tok {kind} c={c}", "instant", chat_body(INSTANT.model, 16, stream),
                          stream=stream, concurrency=c, timing=timing, params={"tokens": 16})
            if c == 1:
                r.targets.append(Target("added TTFT p50, c=1 stream", "added_ttft_p50_ms", "<=", 2, "ms") if stream
                                 else Target("added p50, c=1 non-streamed", "added_p50_ms", "<=", 2, "ms"))
            r.targets.append(Target(f"gateway CPU/request, {kind} c={c}", "cpu_ms_per_request", "<=",
                                    2.5 if stream else 1.5, "ms"))
            r.targets.append(STATEMENTS)
            results.append(r)
    return results


@scenario("long", sims=("instant",), help="instant upstream, 128-token streams, concurrency 16 (CPU per chunk)")
def long_streams(b: Bench) -> list[Result]:
    body = chat_body(INSTANT.model, 128, True)
    chunks = b.count_chunks(b.gateways["main"].url, body, b.auth())
    r = b.compare("long", "128 tok stream c=16", "instant", body, stream=True, concurrency=16, timing=b.timing(),
                  params={"tokens": 128})
    r.metrics["chunks_per_stream"] = chunks
    r.notes.append(f"{chunks} SSE events per stream reach the client (role+token chunks, final chunk, [DONE])")
    r.targets += [Target("gateway CPU per streamed chunk (128-token streams)", "cpu_us_per_chunk", "<=", 30, "us"),
                  STATEMENTS]
    return [r]


# One paced request lasts ttft + tokens x itl (~1.4 s); spreading the clients' first requests
# over that long gives arrivals spread evenly in time, as real users' are.
PACED_CYCLE_S = 0.1 + 64 * 0.02


@scenario("gpu", sims=("gpu",),
          help="GPU-like pacing (ttft 100 ms, itl 20 ms, 64 seqs), 64 tokens, concurrency 64, arrivals spread "
               "and in one burst")
def gpu_pacing(b: Bench) -> list[Result]:
    timing = b.timing("paced")
    results = []
    for stream, spread in ((True, True), (False, True), (True, False)):
        kind = "stream" if stream else "json"
        arrivals = "spread" if spread else "burst"
        r = b.compare("gpu", f"64 tok {kind} c=64 paced, {arrivals}", "gpu", chat_body(GPU.model, 64, stream),
                      stream=stream, concurrency=64, timing=timing, stagger=PACED_CYCLE_S if spread else 0.0,
                      params={"tokens": 64, "max_num_seqs": 64, "arrivals": arrivals})
        r.targets.append(Target(f"throughput vs direct, paced {kind} ({arrivals})", "throughput_ratio", ">=",
                                0.98, "x"))
        if spread:
            if stream:
                r.targets.append(Target("added TTFT p50, paced stream", "added_ttft_p50_ms", "<=", 5, "ms"))
        else:
            r.notes.append("the 64 closed loops start, finish and restart together: every 1.4 s the gateway "
                           "admits 64 requests at once on one core, so the median one waits for ~32 admissions "
                           "(added TTFT p50 ~ 32 x admission CPU); reported, not a target")
        r.targets.append(STATEMENTS)
        results.append(r)
    return results


# --- fairness -------------------------------------------------------------------------------------
FLOOD = 100  # member A's requests in flight
FAIR_TOKENS = 32


@scenario("fairness", sims=("fair",), members=("flood-a", "fair-b"),
          help="capacity 8 (ttft 100 ms, itl 20 ms): A keeps 100 in flight, B sends one at a time; fair queue ON/OFF")
def fairness(b: Bench) -> list[Result]:
    sim = b.sims["fair"]
    n_b = 8 if b.quick else 20
    cap = 12.0 if b.quick else 30.0  # B's flooded sequence stops early past this (FIFO: ~10 s per request)
    body = chat_body(FAIR.model, FAIR_TOKENS, False)
    results = []
    for mode in ("on", "off"):
        name = "main" if mode == "on" else "nofair"
        if mode == "off":
            b.start_gateway(name, QWENHUB_FAIR_QUEUE="false")
        gw = b.gateways[name]
        b.ledger.begin(None)  # not counted: A's cancelled requests would blur statements/request
        try:
            out = _run(_fair_phase(sim.root_url, gw.url, body, b.auth("flood-a"), b.auth("fair-b"), n_b, cap))
        finally:
            b.ledger.end()
            if mode == "off":
                b.stop_gateway(name)
        idle, flooded, samples, completed, flood_s = out
        idle_ok = [r.latency * 1000 for r in idle if r.ok]
        flood_ok = [r.latency * 1000 for r in flooded if r.ok]
        running = [s[0] for s in samples]
        waiting = [s[1] for s in samples]
        m = {
            "b_idle_p50_ms": percentile(idle_ok, 50), "b_flooded_p50_ms": percentile(flood_ok, 50),
            "b_flooded_max_ms": max(flood_ok) if flood_ok else None,
            "b_ratio": (percentile(flood_ok, 50) / percentile(idle_ok, 50)) if idle_ok and flood_ok else None,
            "b_requests_idle": len(idle_ok), "b_requests_flooded": len(flood_ok),
            "b_errors": sum(not r.ok for r in idle + flooded),
            "upstream_running_mean": statistics.fmean(running) if running else None,
            "upstream_running_min": min(running) if running else None,
            "upstream_waiting_mean": statistics.fmean(waiting) if waiting else None,
            "upstream_completed_per_s": completed / flood_s if flood_s else None,
            "samples": len(samples),
        }
        r = Result("fairness", f"fair queue {mode.upper()}", {
            "capacity": 8, "tokens": FAIR_TOKENS, "a_in_flight": FLOOD, "b_requests": n_b,
            "b_flooded_cap_s": cap, "QWENHUB_FAIR_QUEUE": mode == "on"}, metrics=m)
        r.targets.append(Target(f"upstream busy during flood (fair {mode.upper()})", "upstream_running_mean", ">=",
                                7.5, "of 8"))
        if len(flood_ok) < n_b:
            r.notes.append(f"B's flooded sequence stopped after {cap:g} s: {len(flood_ok)} of {n_b} requests")
        results.append(r)
        print(f"  fair queue {mode.upper():3s}: B p50 idle {m['b_idle_p50_ms'] or 0:.0f} ms, flooded "
              f"{m['b_flooded_p50_ms'] or 0:.0f} ms (x{m['b_ratio'] or 0:.2f}, n={len(flood_ok)}); upstream running "
              f"mean {m['upstream_running_mean'] or 0:.2f}/8, waiting {m['upstream_waiting_mean'] or 0:.1f}", flush=True)
    return results


async def _fair_phase(sim_url, gw_url, body, auth_a, auth_b, n_b, cap):
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as sb, \
            aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as sa:
        # B alone on the idle system (after two warm-up requests)
        await run_load(gw_url, CHAT, body, headers=auth_b, concurrency=1, total=2, session=sb)
        idle = await run_load(gw_url, CHAT, body, headers=auth_b, concurrency=1, total=n_b, session=sb)
        # A floods (closed loop, FLOOD in flight); B goes one at a time once the queue has formed
        flood = asyncio.create_task(run_load(gw_url, CHAT, body, headers=auth_a, concurrency=FLOOD, duration=3600,
                                             session=sa))
        await asyncio.sleep(2.0)
        samples: list[tuple[float, float]] = []
        sampler = asyncio.create_task(_sample(sb, sim_url, samples))
        done0 = (await _stats(sb, sim_url))["completed"]
        t0 = time.perf_counter()
        flooded = await run_load(gw_url, CHAT, body, headers=auth_b, concurrency=1, total=n_b, duration=cap,
                                 session=sb)
        flood_s = time.perf_counter() - t0
        completed = (await _stats(sb, sim_url))["completed"] - done0
        sampler.cancel()
        flood.cancel()
        await asyncio.gather(sampler, flood, return_exceptions=True)
    # the cancelled requests leave: wait until the upstream is empty again
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = await _stats(s, sim_url)
            if st["running"] == 0 and st["waiting"] == 0:
                break
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    return idle, flooded, samples, completed, flood_s


async def _stats(session: aiohttp.ClientSession, sim_url: str) -> dict:
    async with session.get(sim_url + "/sim/stats") as resp:
        return await resp.json()


async def _sample(session: aiohttp.ClientSession, sim_url: str, out: list) -> None:
    """vllm:num_requests_running / _waiting from the simulator's /metrics, every 100 ms."""
    while True:
        async with session.get(sim_url + "/metrics") as resp:
            m = parse_metrics(await resp.text())
        out.append((m.get("vllm:num_requests_running", 0.0), m.get("vllm:num_requests_waiting", 0.0)))
        await asyncio.sleep(0.1)


# --- closing a month ------------------------------------------------------------------------------
CLOSE_MEMBERS = 50
CLOSE_ROWS = 1_000_000


@scenario("close", sims=(), members=(), gateway=False,
          help=f"period_close of a month: {CLOSE_MEMBERS} members (Asia/Shanghai), {CLOSE_ROWS:,} usage rows made "
               "in SQL; then a second close")
def close_month(b: Bench) -> list[Result]:
    """Data and timing run in subprocesses (bench.closedata): the bench process stays off the bench database."""
    rows = f"{CLOSE_ROWS // 1_000_000}M" if CLOSE_ROWS % 1_000_000 == 0 else f"{CLOSE_ROWS:,}"
    print(f"  generating {CLOSE_ROWS:,} usage rows for {CLOSE_MEMBERS} members ...", flush=True)
    gen = django_json("bench.closedata", "generate", {"members": CLOSE_MEMBERS, "rows": CLOSE_ROWS})
    print(f"  generated {gen['rows']:,} rows in {gen['insert_s']:.1f} s (setup {gen['setup_s']:.1f} s, counters "
          f"{gen['counters_s']:.1f} s, VACUUM ANALYZE {gen['vacuum_analyze_s']:.1f} s, table {gen['table_mb']:.0f} MB);"
          f" closing {gen['start'][:7]} ...", flush=True)
    out = django_json("bench.closedata", "close", {"team": gen["team"], "start": gen["start"]})
    print(f"  close {out['close_s']:.2f} s ({out['close_queries']} queries, {out['close_sql_s']:.2f} s in SQL), "
          f"second close {out['second_close_s'] * 1000:.1f} ms ({out['second_close_queries']} queries)", flush=True)
    params = {"members": CLOSE_MEMBERS, "rows": gen["rows"], "timezone": "Asia/Shanghai", "month": gen["start"][:7],
              "models": 3, "policy": "usage (model and completion weights)"}
    generated = Result("close", f"generate {rows} usage rows", params, metrics={
        "insert_s": gen["insert_s"], "counters_s": gen["counters_s"], "vacuum_analyze_s": gen["vacuum_analyze_s"],
        "setup_s": gen["setup_s"], "table_mb": round(gen["table_mb"], 1)})
    generated.notes.append("one INSERT ... SELECT FROM generate_series; counters: two INSERT ... SELECT; setup = team, "
                           "members, keys and policy through the services; VACUUM ANALYZE because this server "
                           "runs without autovacuum")
    checks_ok = (out["reconciliation_ok"] and out["tokens_match"] and out["lines_sum_to_invoices"]
                 and out["second_close_unchanged"])
    closed = Result("close", f"close {CLOSE_MEMBERS} members, {rows} rows", params, metrics={
        "close_s": out["close_s"], "close_queries": out["close_queries"], "close_sql_s": out["close_sql_s"],
        "second_close_s": out["second_close_s"], "second_close_queries": out["second_close_queries"],
        "invoices": out["invoices"], "cost_difference": float(out["cost_difference"]),
        "reconciliation_mismatches": out["reconciliation_mismatches"],
        "second_close_new_invoices": out["second_close_new_invoices"],
        "checks": "clean" if checks_ok else "FAILED",
        "cost": out["cost"], "invoiced": out["invoiced"], "statuses": out["statuses"],
        "usage_totals": out["usage_totals"], "invoiced_totals": out["invoiced_totals"],
        "slowest_queries": out["slowest"], "statement_kinds": out["statement_kinds"]})
    closed.targets += [
        Target("close time", "close_s", "<=", 10, "s"),
        Target("close: invoices - the team's cost", "cost_difference", "<=", 0, "CNY"),
        Target("close: usage rows vs invoice lines, mismatches", "reconciliation_mismatches", "<=", 0),
        Target("second close: new invoices", "second_close_new_invoices", "<=", 0),
    ]
    if not checks_ok:
        closed.notes.append(f"CHECKS FAILED: reconciliation ok={out['reconciliation_ok']}, tokens "
                            f"{out['usage_totals']} (rows) vs {out['invoiced_totals']} (lines), lines sum to invoices="
                            f"{out['lines_sum_to_invoices']}, second close unchanged={out['second_close_unchanged']}")
    closed.notes.append(f"slowest statement {out['slowest'][0]['s']:.2f} s: {out['slowest'][0]['sql'][:160]}")
    closed.notes.append("statements: " + ", ".join(f"{k} x{n}" for k, n in out["statement_kinds"].items()))
    return [generated, closed]


# --- the dashboards on a big month ------------------------------------------------------------------
PAGES_MEMBERS = 50
PAGES_ROWS = 1_000_000


@scenario("pages", sims=(), members=(), gateway=False,
          help=f"the team page and a member's page with {PAGES_ROWS:,} usage rows in this month across "
               f"{PAGES_MEMBERS} members")
def dashboard_pages(b: Bench) -> list[Result]:
    """Data and rendering run in subprocesses (bench.pagesdata), like the close scenario."""
    print(f"  generating {PAGES_ROWS:,} usage rows this month for {PAGES_MEMBERS} members ...", flush=True)
    gen = django_json("bench.pagesdata", "generate", {"members": PAGES_MEMBERS, "rows": PAGES_ROWS})
    print(f"  generated {gen['rows']:,} rows in {gen['insert_s']:.1f} s; rendering ...", flush=True)
    out = django_json("bench.pagesdata", "render", {"team": gen["team"], "repeat": 5})
    print(f"  the schedule's rollup of the month's {out['rollup_days']} past days took {out['rollup_s']:.1f} s",
          flush=True)
    params = {"members": PAGES_MEMBERS, "rows": gen["rows"], "month": gen["start"][:7], "renders": 5}
    results = []
    for page, path, limit in (("team", "/team/", 1.0), ("member", "/", 0.3)):
        got = out[page]
        print(f"  {path}: cold {got['cold_s'] * 1000:.0f} ms ({got['cold_queries']} queries), then median "
              f"{got['median_s'] * 1000:.0f} ms, slowest {got['max_s'] * 1000:.0f} ms ({got['queries']} queries), "
              f"{got['bytes'] / 1024:.0f} KiB", flush=True)
        r = Result("pages", f"{page} page ({path})", params, metrics={
            "cold_s": got["cold_s"], "cold_queries": got["cold_queries"], "median_s": got["median_s"],
            "max_s": got["max_s"], "queries": got["queries"], "kib": got["bytes"] / 1024})
        r.targets.append(Target(f"{page} page, median render", "median_s", "<=", limit, "s"))
        r.targets.append(Target(f"{page} page, cold render", "cold_s", "<=", limit, "s"))
        r.notes.append("Django's test client in one process: the view, its SQL and the template, no HTTP server; "
                       "seen on the month's last day at 18:00, its past days rolled up as the schedule has done by "
                       "then; cold = an empty cache (the month's split for a minute, past days for an hour)")
        results.append(r)
    return results


# --- the soak -------------------------------------------------------------------------------------
@scenario("soak", sims=(), members=(), gateway=False,
          help="200 users for 2 minutes (--users, --seconds) on 2 uvicorn workers, paced upstream, 10 % "
               "disconnects, 2 members over quota; RSS, connections, Redis keys and TTLs, reconcile, usage rows")
def soak(b: Bench) -> list[Result]:
    """Its own database (bench.soak.DB_NAME) and a private Redis, started and checked by bench.soak."""
    from bench import soak as soak_run

    cfg = soak_run.Config(users=b.args.users, seconds=b.args.seconds)
    db = BenchDatabase(name=soak_run.DB_NAME)
    db.create()
    try:
        soak_run.migrate(db)
        out = soak_run.run_soak(cfg, db=db, procs=b.procs)
    finally:
        if not b.args.keep_db:
            db.drop()
        db.close()
    soak_run.print_soak(out)
    return [soak_run.result(out)]
