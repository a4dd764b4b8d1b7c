"""The soak's figures from what it measured, its checks (``evaluate``), its Result and printout."""
from __future__ import annotations

from bench.loadgen import percentile
from bench.soak.config import (CONN_GROWTH, EXECUTOR_THREADS, KEYS_GROWTH, POOL_SIZE, QUOTAS, RSS_GROWTH_MB,
                               SIM_ARGS, WORKERS, Config, Soak)
from bench.soak.users import Req, Sample


def figures(cfg: Config, reqs: list[Req], samples: list[Sample], wall: float) -> dict:
    by_kind: dict[str, dict[str, int]] = {}
    for r in reqs:
        kind = "quota member" if r.quota_member else r.kind
        label = f"HTTP {r.status}" + (f" {r.code}" if r.code else "") if not r.error else "error"
        by_kind.setdefault(kind, {})
        by_kind[kind][label] = by_kind[kind].get(label, 0) + 1
    outcomes: dict[str, int] = {}
    for r in reqs:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    unexpected = [r for r in reqs if r.outcome == "unexpected"]
    before = next((s for s in samples if s.t >= cfg.warmup_s), samples[-1] if samples else None)
    after = samples[-1] if samples else None
    ok_json = [r.latency * 1000 for r in reqs if r.outcome == "ok" and r.kind == "json"]
    ok_stream = [r for r in reqs if r.outcome == "ok" and r.kind == "stream"]
    quota_429 = {u: sum(1 for r in reqs if r.user == u and r.outcome == "quota_429") for u in range(len(QUOTAS))}

    def pct(xs, p):
        v = percentile(xs, p)
        return None if v is None else round(v, 1)

    return {
        "users": cfg.users, "seconds": cfg.seconds, "warmup_s": cfg.warmup_s, "wall_s": round(wall, 1),
        "requests": len(reqs), "requests_per_s": round(len(reqs) / wall, 1) if wall else None,
        "statuses": by_kind, "outcomes": outcomes,
        "unexpected": len(unexpected),
        "unexpected_examples": [f"{r.kind} user {r.user}: HTTP {r.status} {r.code or ''} {r.error or ''}".strip()
                                for r in unexpected[:5]],
        "quota_429_per_quota_member": list(quota_429.values()),
        "disconnects": outcomes.get("disconnected", 0),
        "json_p50_ms": pct(ok_json, 50), "json_p99_ms": pct(ok_json, 99),
        "stream_p50_ms": pct([r.latency * 1000 for r in ok_stream], 50),
        "stream_p99_ms": pct([r.latency * 1000 for r in ok_stream], 99),
        "ttft_p50_ms": pct([r.ttft * 1000 for r in ok_stream if r.ttft is not None], 50),
        "ttft_p99_ms": pct([r.ttft * 1000 for r in ok_stream if r.ttft is not None], 99),
        "samples": len(samples),
        "before_t_s": round(before.t, 1) if before else None, "after_t_s": round(after.t, 1) if after else None,
        "rss_before_mb": round(before.rss_mb, 1) if before else None,
        "rss_after_mb": round(after.rss_mb, 1) if after else None,
        "rss_max_mb": round(max(s.rss_mb for s in samples), 1) if samples else None,
        "rss_kb_per_request": round((after.rss_mb - before.rss_mb) * 1024 / max(1, sum(
            1 for r in reqs if before.t <= r.start <= after.t)), 2) if before and after else None,
        "rss_series_mb": [round(s.rss_mb, 1) for s in samples[::5]],  # every 10 s
        "pg_connections_before": before.pg_connections if before else None,
        "pg_connections_after": after.pg_connections if after else None,
        "pg_connections_max": max(s.pg_connections for s in samples) if samples else None,
        "redis_keys_before": before.redis_keys if before else None,
        "redis_keys_after": after.redis_keys if after else None,
        "redis_keys_max": max(s.redis_keys for s in samples) if samples else None,
        "admitted": outcomes.get("ok", 0) + outcomes.get("disconnected", 0),
    }


def evaluate(f: dict) -> dict[str, tuple[bool, str]]:
    """The soak's checks on its figures: name -> (passed, what was measured)."""
    checks: dict[str, tuple[bool, str]] = {}
    statuses = "; ".join(f"{k}: " + ", ".join(f"{s} x{n}" for s, n in sorted(v.items()))
                         for k, v in sorted(f["statuses"].items()))
    quota = f["quota_429_per_quota_member"]
    checks["statuses: only the intended 429s"] = (
        f["unexpected"] == 0 and f["requests"] > 0 and all(n > 0 for n in quota) and f["disconnects"] > 0,
        f"{statuses}; 429 insufficient_quota per quota member {quota}"
        + (f"; UNEXPECTED {f['unexpected']}: {f['unexpected_examples']}" if f["unexpected"] else ""))
    if f["gateway_log_errors"]:
        checks["statuses: only the intended 429s"] = (False, checks["statuses: only the intended 429s"][1]
                                                      + f"; gateway log: {f['gateway_log_errors'][:3]}")
    growth = (f["rss_after_mb"] or 0) - (f["rss_before_mb"] or 0)
    checks["gateway RSS steady"] = (
        f["rss_before_mb"] is not None and growth <= RSS_GROWTH_MB,
        f"{f['rss_before_mb']} -> {f['rss_after_mb']} MB ({growth:+.1f} MB, bound +{RSS_GROWTH_MB:g}; "
        f"{f['rss_kb_per_request']} KB per request in between); "
        f"max {f['rss_max_mb']}, idle {f['rss_idle_mb']} MB, {f['gateway_processes']} processes")
    bound = WORKERS * (POOL_SIZE + EXECUTOR_THREADS)
    before, after = f["pg_connections_before"], f["pg_connections_after"]
    checks["PostgreSQL connections steady and bounded"] = (
        before is not None and after - before <= CONN_GROWTH and f["pg_connections_max"] <= bound,
        f"{before} -> {after} (max {f['pg_connections_max']}, bound {bound}; idle {f['pg_connections_idle']})")
    kb, ka = f["redis_keys_before"], f["redis_keys_after"]
    checks["Redis keys steady"] = (
        kb is not None and ka <= KEYS_GROWTH * kb + 50 and f["redis_keys_idle"] <= KEYS_GROWTH * kb + 50,
        f"{kb} -> {ka} (max {f['redis_keys_max']}; end of load {f['redis_keys_end_of_load']}, "
        f"idle {f['redis_keys_idle']})")
    missing = f["redis_keys_without_ttl"]
    checks["every Redis key has a TTL"] = (not missing, f"{len(missing)} without: {missing[:5]}" if missing
                                           else "all keys expire")
    checks["no reservation left for the sweep"] = (
        f["reservations_left"] == 0, f"{f['reservations_left']} left after {f['reservations_waited_s']} s")
    checks["manage.py reconcile clean"] = (
        f["reconcile_rc"] == 0, f["reconcile_output"].splitlines()[-1] if f["reconcile_output"] else "no output")
    answered = f["usage_rows_by_status"].get("ok", 0) + f["usage_rows_by_status"].get("client_disconnected", 0)
    checks["one usage row per admitted request"] = (
        f["usage_mismatches"] == 0 and answered == f["admitted"],
        f"{f['admitted']} admitted (200s + disconnects), {answered} ok/client_disconnected rows; "
        f"{f['usage_rows']} rows in all {f['usage_rows_by_status']}"
        + (f"; {f['usage_mismatches']} mismatches, e.g. {f['usage_mismatch_examples']}"
           if f["usage_mismatches"] else ""))
    return checks


def result(soak: Soak):
    """The soak as the bench's Result: its figures, its checks as lines, numeric targets for the table."""
    from bench.figures import Result, Target

    f, cfg = soak.figures, soak.config
    metrics = {k: v for k, v in f.items() if k not in ("reconcile_output",)}
    metrics["rss_growth_mb"] = round((f["rss_after_mb"] or 0) - (f["rss_before_mb"] or 0), 1)
    metrics["pg_connections_growth"] = (f["pg_connections_after"] or 0) - (f["pg_connections_before"] or 0)
    metrics["redis_keys_without_ttl_count"] = len(f["redis_keys_without_ttl"])
    metrics["checks_failed"] = sum(not ok for ok, _ in soak.checks.values())
    metrics["checks"] = {name: ("PASS: " if ok else "FAIL: ") + detail for name, (ok, detail) in soak.checks.items()}
    r = Result("soak", f"{cfg.users} users, {cfg.seconds:g} s", {
        "users": cfg.users, "seconds": cfg.seconds, "warmup_s": cfg.warmup_s, "workers": WORKERS,
        "think_s": cfg.think_s, "stream_share": cfg.stream_share, "disconnect_share": cfg.disconnect_share,
        "upstream": " ".join(SIM_ARGS[2:]), "quota_members": list(QUOTAS)}, metrics=metrics)
    r.targets += [
        Target("soak: unexpected statuses or errors", "unexpected", "<=", 0),
        Target("soak: gateway RSS growth (master + workers)", "rss_growth_mb", "<=", RSS_GROWTH_MB, "MB"),
        Target("soak: PostgreSQL connections growth", "pg_connections_growth", "<=", CONN_GROWTH),
        Target("soak: Redis keys without a TTL", "redis_keys_without_ttl_count", "<=", 0),
        Target("soak: reservations left for the sweep", "reservations_left", "<=", 0),
        Target("soak: usage rows not matching a request", "usage_mismatches", "<=", 0),
        Target("soak: checks failed", "checks_failed", "<=", 0),
    ]
    return r


def print_soak(soak: Soak) -> None:
    f = soak.figures
    print(f"  {f['requests']} requests in {f['wall_s']} s ({f['requests_per_s']}/s), {f['users']} users; "
          f"non-streamed p50/p99 {f['json_p50_ms']}/{f['json_p99_ms']} ms, streams {f['stream_p50_ms']}/"
          f"{f['stream_p99_ms']} ms, TTFT {f['ttft_p50_ms']}/{f['ttft_p99_ms']} ms; {f['disconnects']} disconnects, "
          f"{f['upstream_aborted']} requests aborted upstream")
    print(f"  {'':36s} {'before':>8s} {'after':>8s} {'max':>8s} {'idle':>8s}")
    for label, key, unit in (("gateway RSS (MB, master + workers)", "rss", "_mb"),
                             ("PostgreSQL connections", "pg_connections", ""),
                             ("Redis keys", "redis_keys", "")):
        print(f"  {label:36s} " + " ".join(f"{f[f'{key}_{when}{unit}']!s:>8s}"
                                           for when in ("before", "after", "max", "idle")))
    print(f"  gateway RSS every 10 s (MB): {' '.join(f'{x:g}' for x in f['rss_series_mb'])}")
    for name, (ok, detail) in soak.checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")


