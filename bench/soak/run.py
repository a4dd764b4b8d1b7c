"""One soak: start the private Redis, the simulator and the 2-worker gateway, drive the users, count."""
from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.procs import PY, ROOT, BenchDatabase, Pinning, Processes, bench_env
from bench.soak.checks import evaluate, figures
from bench.soak.config import MAX_CONCURRENCY, SIM_ARGS, TEAM, WORKERS, Config, Soak
from bench.soak.probes import RedisServer, key_shapes, process_tree_rss_mb, redis_keys
from bench.soak.users import _drive


def _env(db: BenchDatabase, redis_url: str, **extra: str) -> dict[str, str]:
    return bench_env(DATABASE_URL=db.url, REDIS_URL=redis_url, **extra)


def _django(module_args: list[str], env: dict, *, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([PY, *module_args], cwd=ROOT, env=env, capture_output=True, text=True)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(module_args[:3])} exited {out.returncode}: {out.stderr[-2000:]}")
    return out


def migrate(db: BenchDatabase) -> None:
    """`manage.py migrate` into db (created by the caller)."""
    _django(["manage.py", "migrate", "--noinput", "-v", "0"], bench_env(DATABASE_URL=db.url))


def run_soak(cfg: Config, *, db: BenchDatabase, procs: Processes, sim_args: tuple[str, ...] = (),
             progress=print) -> Soak:
    """Run one soak against db (created and migrated); every process goes through procs (the caller stops them)."""
    soak = Soak(cfg)
    mine: list = []  # what this soak started, stopped in the finally (procs.stop_all also would, on Ctrl-C)
    try:
        redis_server = RedisServer()
        procs.started.append(redis_server)
        mine.append(redis_server)
        sim = procs.start_simulator(*SIM_ARGS, *sim_args)
        mine.append(sim)
        env = _env(db, redis_server.url)
        out = _django(["-m", "bench.soak", "setup", json.dumps({
            "users": cfg.users, "base_url": sim.base_url, "max_concurrency": MAX_CONCURRENCY})], env)
        keys = json.loads(out.stdout.strip().splitlines()[-1])["keys"]
        # 2 workers need every core: not pinned (the bench process's own affinity would be inherited)
        every_cpu = Pinning.prefix(tuple(sorted(procs.pinning.gateway + procs.pinning.client)))
        gw = procs.start_gateway("soak", workers=WORKERS, prefix=every_cpu, DATABASE_URL=db.url,
                                 REDIS_URL=redis_server.url)
        mine.append(gw)
        _wait_for_workers(gw.pid)
        progress(f"  {cfg.users} users for {cfg.seconds:g} s (warm-up {cfg.warmup_s:g} s), gateway {WORKERS} "
                 f"workers, private Redis :{redis_server.port} ...")
        reqs, samples, wall = _run(_drive(cfg, gw.url, keys, gw.pid, db, redis_server.client))
        load_keys, load_no_ttl = redis_keys(redis_server.client)
        load_shapes = key_shapes(redis_server.client.scan_iter(count=1000))
        # Wait for the in-flight settlements: the gateway settles every request itself; nothing runs the sweep.
        ids = Path(tempfile.mkstemp(prefix="qh-soak-ids-", suffix=".json")[1])
        try:
            ids.write_text(json.dumps([[r.request_id, r.outcome] for r in reqs]))
            check = json.loads(_django(["-m", "bench.soak", "check", json.dumps({"ids": str(ids), "wait_s": 30})],
                                       env).stdout.strip().splitlines()[-1])
        finally:
            ids.unlink(missing_ok=True)
        reconcile = _django(["manage.py", "reconcile", TEAM], env, check=False)
        idle_rss, n_procs = process_tree_rss_mb(gw.pid)
        idle_conns = db.connections()
        idle_keys, idle_no_ttl = redis_keys(redis_server.client)
        log_tail = gw.log_tail(1_000_000)
        upstream = sim.metrics()
    finally:
        for proc in reversed(mine):
            procs.stop(proc)

    soak.figures = figures(cfg, reqs, samples, wall)
    soak.figures.update({
        "redis_keys_end_of_load": load_keys, "redis_key_shapes_end_of_load": load_shapes, "redis_keys_idle": idle_keys,
        "redis_keys_without_ttl": sorted(set(load_no_ttl) | set(idle_no_ttl)
                                         | {k for sample in samples for k in sample.no_ttl}),
        "rss_idle_mb": round(idle_rss, 1), "gateway_processes": n_procs, "pg_connections_idle": idle_conns,
        "reservations_left": check["reservations_left"], "reservations_waited_s": check["waited_s"],
        "usage_rows": check["rows"], "usage_rows_by_status": check["by_status"],
        "usage_mismatches": check["mismatches"], "usage_mismatch_examples": check["examples"],
        "upstream_aborted": int(upstream.get('vllm:request_success_total{finished_reason="abort"}', 0)),
        "reconcile_rc": reconcile.returncode,
        "reconcile_output": (reconcile.stdout + reconcile.stderr).strip()[-2000:],
        "gateway_log_errors": [line for line in log_tail.splitlines()
                               if " ERROR " in line or line.startswith("ERROR:") or "Traceback" in line][:10],
    })
    soak.checks = evaluate(soak.figures)
    return soak


def _wait_for_workers(pid: int, timeout: float = 30.0) -> None:
    """uvicorn's master answers as soon as one worker does: wait until all the workers exist."""
    deadline = time.monotonic() + timeout
    while process_tree_rss_mb(pid)[1] < WORKERS + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the last one imports and starts its lifespan


def _run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)

