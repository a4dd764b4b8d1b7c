"""The soak: many users for minutes against the gateway as deployed, then checks that nothing leaked.

    python -m bench --only soak                       # 200 users, 2 minutes
    python -m bench --only soak --users 10 --seconds 8

Everything on loopback: the gateway under uvicorn with 2 workers (production settings),
the bench database on the PostgreSQL server, a PRIVATE ``redis-server`` on a free port (so
its keys are the gateway's alone), and the simulator as the upstream with GPU-like pacing
(100 ms to the first token, 20 ms per token, ±20 % jitter, 64 sequences). Every user is a
member with its own key and loops: think (exponential, mean 2 s), then one request —
30 % non-streamed, 60 % streamed to the end, 10 % streamed and closed by the client after a
few chunks (a disconnect mid-stream); the mix is exact in every ten requests of a user (users
at different phases), lengths and think times are random (seeded). Two of the users are
members with a tiny quota (3 requests; 150 tokens) and soon get 429 ``insufficient_quota``.
The others have rate limits they never reach, so the limiter keeps its buckets in Redis.

While the users run, the gateway's RSS (the uvicorn master and its workers, from /proc), the
bench database's connections (pg_stat_activity) and the Redis key count are sampled every
2 s; "before" is the sample at the end of the warm-up, "after" the last one under load.
Once the users stop and the in-flight requests have settled, it checks (see ``evaluate``):
statuses, RSS, connections, Redis keys and their TTLs, that no reservation is left for the
sweep, ``manage.py reconcile soak`` and one usage row per request the gateway answered.

The bench process never opens the bench database through Django: the setup and the
final counting run in subprocesses (``python -m bench.soak setup|check '<json>'``).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.loadgen import percentile
from bench.procs import PY, ROOT, BenchDatabase, Pinning, Processes, bench_env, free_port

DB_NAME = "qwenhub_bench_soak"
TEAM = "soak"
MODEL = "bench-soak"
CHAT = "/v1/chat/completions"
SIM_ARGS = ("--served-model-name", MODEL, "--ttft-ms", "100", "--itl-ms", "20", "--max-num-seqs", "64",
            "--jitter", "0.2", "--seed", "11")
MAX_CONCURRENCY = 64
WORKERS = 2
POOL_SIZE = 8  # QWENHUB_DB_POOL_SIZE, per worker (the default): the ledger's asyncpg pool
# Key lookups and the routing table run Django in the event loop's default executor (proxy.gateway.db,
# sync_to_async(thread_sensitive=False)): one Django connection per thread, kept CONN_MAX_AGE (60 s).
EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default size
QUOTAS = ({"request_quota": 3}, {"token_quota": 150})  # the two members set to run out
# Every other member has rate limits it never reaches (a user sends one request at a time, ~30 a minute):
# the limiter's buckets and in-flight sets live in Redis, as they would for a team that sets limits.
LIMITS = {"requests_per_minute": 600, "tokens_per_minute": 1_000_000, "max_concurrent_requests": 8}
SAMPLE_EVERY = 2.0

# The bounds (why these, bench/README.md "The soak"):
RSS_GROWTH_MB = 20.0  # master + 2 workers over the measured window
CONN_GROWTH = 4  # backends after - before
KEYS_GROWTH = 1.5  # keys after <= 1.5 x before + 50


@dataclass
class Config:
    users: int = 200
    seconds: float = 120.0
    warmup: float | None = None  # default: a quarter of the run, at most 20 s
    think_s: float = 2.0
    stream_share: float = 0.7  # streamed, including the disconnects
    disconnect_share: float = 0.1
    seed: int = 7

    @property
    def warmup_s(self) -> float:
        return self.warmup if self.warmup is not None else min(20.0, self.seconds / 4)


# --- processes ----------------------------------------------------------------------------------
class RedisServer:
    """A private redis-server on a free loopback port, no persistence; stopped with the other processes."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not on PATH")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="qh-soak-redis-")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self._dir, "--loglevel", "warning"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        self.client = redis.Redis(port=self.port, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the private redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self._dir, ignore_errors=True)


def redis_keys(client) -> tuple[int, list[str]]:
    """(number of keys, the keys without a TTL) of the client's database."""
    keys = list(client.scan_iter(count=1000))
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.ttl(k)
    ttls = pipe.execute() if keys else []
    return len(keys), sorted(k.decode(errors="replace") for k, t in zip(keys, ttls) if t == -1)


def key_shapes(keys) -> dict[str, int]:
    """How many keys of each shape (digits replaced by #), e.g. {"ql:r:#": 198}."""
    import re

    out: dict[str, int] = {}
    for k in keys:
        shape = re.sub(r"\d+", "#", k if isinstance(k, str) else k.decode(errors="replace"))
        out[shape] = out.get(shape, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def process_tree_rss_mb(pid: int) -> tuple[float, int]:
    """RSS of a process and all its descendants (MB, from /proc), and how many processes that is."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    kb = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/status") as f:
                kb += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return kb / 1024, len(tree)


# --- the users ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Req:
    user: int
    kind: str  # json | stream | disconnect
    quota_member: bool
    start: float
    latency: float = 0.0
    ttft: float | None = None
    status: int = 0
    code: str | None = None  # the error body's code (429: insufficient_quota)
    request_id: str | None = None
    error: str | None = None  # a transport error, or a stream that did not end with [DONE]

    @property
    def outcome(self) -> str:
        """The class this request is counted in: ok, disconnected, quota_429 or unexpected."""
        if self.error:
            return "unexpected"
        if self.status == 200:
            return "disconnected" if self.kind == "disconnect" else "ok"
        if self.status == 429 and self.code == "insufficient_quota" and self.quota_member:
            return "quota_429"
        return "unexpected"


def _body(rng: random.Random, kind: str) -> dict:
    tokens = rng.randint(16, 96) if kind != "disconnect" else rng.randint(48, 96)
    body = {"model": MODEL, "max_tokens": tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Question {rng.randint(1, 10**6)}: explain a soak test."}]}
    if kind != "json":
        body["stream"] = True
    return body


async def _one(session, url: str, key: str, user: int, kind: str, quota: bool, rng: random.Random, t0: float) -> Req:
    r = Req(user, kind, quota, time.perf_counter() - t0)
    start = time.perf_counter()
    try:
        async with session.post(url, json=_body(rng, kind), headers={"Authorization": f"Bearer {key}"}) as resp:
            r.status, r.request_id = resp.status, resp.headers.get("x-request-id")
            if resp.status != 200:
                payload = await resp.read()
                try:
                    r.code = json.loads(payload)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    r.code = None
            elif kind == "json":
                await resp.read()
            else:
                stop_after = rng.randint(2, 6) if kind == "disconnect" else None
                chunks, tail = 0, b""
                async for chunk in resp.content.iter_any():
                    if r.ttft is None:
                        r.ttft = time.perf_counter() - start
                    chunks += 1
                    tail = (tail + chunk)[-14:]
                    if stop_after is not None and chunks >= stop_after:
                        resp.close()  # the client goes away mid-stream: the connection is closed
                        break
                if stop_after is not None and chunks < stop_after:
                    r.error = f"the stream ended after {chunks} chunks, before the client could leave"
                elif stop_after is None and tail != b"data: [DONE]\n\n":
                    r.error = "stream without data: [DONE]"
    except Exception as exc:  # noqa: BLE001 - every failure is a figure
        r.error = f"{type(exc).__name__}: {exc}"
    r.latency = time.perf_counter() - start
    return r


async def _user(session, url, key, user, quota, cfg: Config, t0, stop_at, out: list[Req]) -> None:
    rng = random.Random(cfg.seed * 100_003 + user)
    await asyncio.sleep(rng.uniform(0, min(5.0, cfg.seconds / 4)))  # users arrive over the first seconds
    n = 0
    while time.perf_counter() < stop_at:
        # the mix exactly, in every ten requests of a user, each user at its own phase (3 and 7 are prime to 10)
        slot = ((n * 7 + user * 3) % 10) / 10
        n += 1
        kind = "disconnect" if slot < cfg.disconnect_share else "stream" if slot < cfg.stream_share else "json"
        out.append(await _one(session, url, key, user, kind, quota, rng, t0))
        think = min(rng.expovariate(1 / cfg.think_s), 4 * cfg.think_s)
        await asyncio.sleep(max(0.0, min(think, stop_at - time.perf_counter())))


@dataclass
class Sample:
    t: float
    rss_mb: float
    processes: int
    pg_connections: int
    redis_keys: int
    no_ttl: list[str]


async def _sampler(gateway_pid: int, db: BenchDatabase, redis_client, t0: float, out: list[Sample]) -> None:
    def sample() -> Sample:
        rss, n = process_tree_rss_mb(gateway_pid)
        n_keys, no_ttl = redis_keys(redis_client)  # every key's TTL: a key written without one shows here
        return Sample(time.perf_counter() - t0, rss, n, db.connections(), n_keys, no_ttl)

    while True:
        out.append(await asyncio.to_thread(sample))  # off the loop the users run on
        await asyncio.sleep(SAMPLE_EVERY)


async def _drive(cfg: Config, gw_url: str, keys: list[str], gateway_pid: int, db: BenchDatabase, redis_client):
    reqs: list[Req] = []
    samples: list[Sample] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120),
                                     skip_auto_headers=("User-Agent",)) as session:
        t0 = time.perf_counter()
        sampler = asyncio.create_task(_sampler(gateway_pid, db, redis_client, t0, samples))
        await asyncio.gather(*(_user(session, gw_url + CHAT, key, i, i < len(QUOTAS), cfg, t0, t0 + cfg.seconds,
                                     reqs) for i, key in enumerate(keys)))
        wall = time.perf_counter() - t0
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    return reqs, samples, wall


# --- running it ---------------------------------------------------------------------------------
@dataclass
class Soak:
    """What one soak measured (figures) and its checks (name -> (passed, detail))."""

    config: Config
    figures: dict = field(default_factory=dict)
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for ok, _ in self.checks.values())


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


# --- the Django side (subprocesses with the soak's env) -------------------------------------------------
def _setup_main(spec: dict) -> dict:
    """A team, one member with a key per user (the first ones with tiny quotas), the simulator's upstream."""
    import django

    django.setup()
    from django.db import connection

    from proxy.services import upstream_add
    from tenants.services import api_key_issue, member_add, member_update, team_create

    team = team_create(slug=TEAM, name="Soak", timezone_name="UTC", currency="CNY", monthly_cost="3000")
    keys = []
    for i in range(spec["users"]):
        quota = QUOTAS[i] if i < len(QUOTAS) else {}
        member = member_add(team=team, username=f"soak-{i:03d}", **quota)
        if not quota:
            member = member_update(member=member, data=LIMITS)
        keys.append(api_key_issue(member=member, label="soak")[1])
    upstream_add(name="soak", base_url=spec["base_url"], served_name=MODEL, public_name=MODEL,
                 max_concurrency=spec["max_concurrency"])
    connection.close()
    return {"keys": keys}


# the usage row's status each client outcome must have
ROW_STATUS = {"ok": {"ok"}, "disconnected": {"client_disconnected", "ok"}, "quota_429": {"rejected"}}


def _check_main(spec: dict) -> dict:
    """After the load: wait until no reservation is held, then match the usage rows with the client's requests."""
    import django

    django.setup()
    from django.db import connection
    from django.db.models import Count

    from billing.models import UsageRecord
    from tenants.models import QuotaReservation

    t0 = time.monotonic()
    reservations = QuotaReservation.objects.filter(counter__member__team__slug=TEAM)
    while reservations.exists() and time.monotonic() - t0 < spec["wait_s"]:
        time.sleep(0.2)
    waited = time.monotonic() - t0
    left = reservations.count()
    time.sleep(0.5)  # a request's row and its reservation go in one statement; let the last rows land
    sent = json.loads(Path(spec["ids"]).read_text())
    rows = dict(UsageRecord.objects.filter(team__slug=TEAM).values_list("request_id", "status"))
    mismatches, examples = 0, []
    for request_id, outcome in sent:
        if outcome not in ROW_STATUS:
            continue
        status = rows.get(request_id)
        if status not in ROW_STATUS[outcome]:
            mismatches += 1
            if len(examples) < 5:
                examples.append(f"{request_id} ({outcome}): {status or 'no row'}")
    by_status = dict(UsageRecord.objects.filter(team__slug=TEAM).values_list("status").annotate(n=Count("id")))
    connection.close()
    return {"reservations_left": left, "waited_s": round(waited, 1), "rows": len(rows), "by_status": by_status,
            "mismatches": mismatches, "examples": examples}


if __name__ == "__main__":
    commands = {"setup": _setup_main, "check": _check_main}
    if len(sys.argv) != 3 or sys.argv[1] not in commands:
        sys.exit("usage: python -m bench.soak setup|check '<json spec>'")
    print(json.dumps(commands[sys.argv[1]](json.loads(sys.argv[2])), default=str))
