"""Printing the benchmark's table and targets, and writing the JSON (bench/results/latest.json)."""
from __future__ import annotations

import json
from pathlib import Path

from bench.figures import Result


def _f(x, fmt: str = ".2f", width: int = 8) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def print_report(results: list[Result], meta: dict) -> None:
    print()
    print(f"QwenHub gateway vs. direct upstream — {meta['machine']}, commit {meta['commit'] or '?'}"
          f"{' (QUICK)' if meta.get('quick') else ''}{' (INTERRUPTED)' if meta.get('interrupted') else ''}")
    print(f"  {meta['gateway']}; {meta['pinning']}")
    if meta.get("yardstick_us"):
        before, after = meta["yardstick_us"]
        print(f"  machine speed: sum(range(1000)) took {before} µs in Python at the start, {after} µs at the end "
              "(absolute CPU and latency figures scale with it)")
    print(f"  statements: {meta['statements_method']}")
    compared = [r for r in results if r.direct is not None and r.gateway is not None]
    if compared:
        head = (f"{'scenario / row':32s} {'target':8s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'TTFT50':>8s} "
                f"{'TTFT99':>8s} {'CPU ms/req':>10s} {'x direct':>8s} {'+p50 ms':>8s} {'+p99 ms':>8s} "
                f"{'+TTFT50':>8s} {'+TTFT99':>8s} {'stmt/req path/all':>17s}")
        print()
        print(head)
        print("-" * len(head))
        for r in compared:
            f = r.figures()
            for stats in (r.direct, r.gateway):
                gw = stats is r.gateway
                name = f"{r.scenario}: {r.row}" if not gw else ""
                line = (f"{name:32s} {stats.target:8s} {_f(stats.rps, '.0f')} {_f(stats.pct(50))} {_f(stats.pct(99))} "
                        f"{_f(stats.pct(50, True))} {_f(stats.pct(99, True))} ")
                if gw:
                    line += (f"{_f(stats.cpu_ms_per_request, '.3f', 10)} {_f(f.get('throughput_ratio'), '.3f')} "
                             f"{_f(f.get('added_p50_ms'))} {_f(f.get('added_p99_ms'))} "
                             f"{_f(f.get('added_ttft_p50_ms'))} {_f(f.get('added_ttft_p99_ms'))} "
                             f"{_f(stats.path_statements_per_request, '.2f', 12)}/{_f(stats.statements_per_request, '.2f', 4)}")
                errors = stats.errors()
                if errors:
                    line += f"  errors: {errors}"
                print(line.rstrip())
            if "cpu_us_per_chunk" in f:
                print(f"{'':32s} gateway CPU per streamed chunk: {f['cpu_us_per_chunk']:.1f} us "
                      f"({r.metrics['chunks_per_stream']} SSE events per stream)")
    others = [r for r in results if r not in compared]
    if others:
        print()
        for r in others:
            m = r.metrics
            if r.scenario == "fairness":
                print(f"fairness: {r.row:15s} B p50 idle {_f(m.get('b_idle_p50_ms'), '.0f', 5)} ms (n={m.get('b_requests_idle')})"
                      f"  flooded {_f(m.get('b_flooded_p50_ms'), '.0f', 6)} ms (n={m.get('b_requests_flooded')})"
                      f"  ratio x{_f(m.get('b_ratio'), '.2f', 5).strip()}"
                      f"  | upstream running mean {_f(m.get('upstream_running_mean'), '.2f', 4).strip()}/8"
                      f" (min {_f(m.get('upstream_running_min'), '.0f', 1).strip()}),"
                      f" waiting mean {_f(m.get('upstream_waiting_mean'), '.1f', 4).strip()},"
                      f" {_f(m.get('upstream_completed_per_s'), '.1f', 4).strip()} completions/s"
                      f"{'  B errors: ' + str(m['b_errors']) if m.get('b_errors') else ''}")
            elif r.scenario == "close" and "close_s" in m:
                print(f"close: {r.row:28s} close {m['close_s']:.2f} s ({m['close_queries']} queries, "
                      f"{m['close_sql_s']:.2f} s in SQL); second close {m['second_close_s'] * 1000:.1f} ms "
                      f"({m['second_close_queries']} queries, {m['second_close_new_invoices']} new invoices); "
                      f"{m['invoices']} invoices, {m['invoiced']} of {m['cost']} CNY; checks {m['checks']}")
            elif r.scenario == "close":
                print(f"close: {r.row:28s} insert {m['insert_s']:.1f} s, counters {m['counters_s']:.2f} s, "
                      f"VACUUM ANALYZE {_f(m['vacuum_analyze_s'], '.1f', 1).strip()} s, setup {m['setup_s']:.1f} s, "
                      f"table {m['table_mb']:.0f} MB")
            elif r.scenario == "soak":
                print(f"soak: {r.row}: {m['requests']} requests ({m['requests_per_s']}/s); RSS {m['rss_before_mb']} -> "
                      f"{m['rss_after_mb']} MB, PostgreSQL connections {m['pg_connections_before']} -> "
                      f"{m['pg_connections_after']}, Redis keys {m['redis_keys_before']} -> {m['redis_keys_after']}")
                for line in m["checks"].values():
                    print(f"{'':10s}{line}")
            else:
                print(f"{r.scenario}: {r.row}: " + ", ".join(f"{k}={v}" for k, v in m.items()))
            for note in r.notes:
                print(f"{'':10s}note: {note}")
    rows = []
    for r in results:
        f = r.figures()
        for t in r.targets:
            rows.append((r, t, f.get(t.key)))
    if rows:
        print()
        head = f"{'target':50s} {'goal':>12s} {'measured':>12s}  row"
        print(head)
        print("-" * (len(head) + 30))
        met = missed = 0
        for r, t, v in rows:
            ok = t.check(v)
            met += ok is True
            missed += ok is False
            verdict = {True: "met", False: "MISSED", None: "n/a"}[ok]
            unit = f" {t.unit}" if t.unit else ""
            print(f"{t.label:50s} {t.op + ' ' + f'{t.limit:g}' + unit:>12s} {_f(v, '.3f', 12)}  "
                  f"{verdict:6s} {r.scenario}: {r.row}")
        print(f"\n{met} targets met, {missed} missed")


def write_json(results: list[Result], meta: dict, out: str) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "results": [r.as_dict() for r in results]}
    path.write_text(json.dumps(data, indent=2, default=str))
    return path
