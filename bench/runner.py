"""The benchmark runner: result records, the measurement loop, the statement ledger and main().

A scenario (bench/scenarios.py) gets a ``Bench`` and returns ``Result`` records. The
usual one calls ``bench.compare(...)``, which runs the same closed-loop load against
the simulator directly and through the gateway, alternating them round by round
(direct, gateway | gateway, direct | ... — an ABBA order, so linear drift of the
machine cancels), and pools the rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import time
import timeit
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from bench.loadgen import Record, percentile, run_load
from bench.procs import (RESULTS, BenchDatabase, GatewayProcess, Pinning, Processes, migrate, redis_flush,
                         setup_world)

CHAT = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "Write a short note about benchmarking an API gateway."}]


def chat_body(model: str, tokens: int, stream: bool) -> dict:
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "ignore_eos": True}
    if stream:
        body["stream"] = True
    return body


# --- result records -----------------------------------------------------------------------------
@dataclass
class RunStats:
    """One target (direct or gateway) of one scenario row, pooled over its rounds."""

    target: str
    records: list[Record] = field(default_factory=list, repr=False)
    rounds: list[dict] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float | None = None  # the gateway process's CPU over the measured windows
    warmup_requests: int = 0
    statements: int | None = None  # PostgreSQL transactions attributed to this target's windows
    statement_requests: int = 0  # requests sent in those windows (warm-up included)
    path_statements: float | None = None  # the gateway's own count of request-path statements (its /metrics)

    def add_round(self, records: list[Record], wall: float, cpu: float | None, warmup: int) -> None:
        self.records += records
        self.wall_s += wall
        if cpu is not None:
            self.cpu_s = (self.cpu_s or 0.0) + cpu
        self.warmup_requests += warmup
        self.statement_requests += warmup + len(records)
        ok = sum(r.ok for r in records)
        self.rounds.append({"requests": len(records), "ok": ok, "wall_s": round(wall, 3),
                            "rps": round(ok / wall, 1) if wall else None,
                            "cpu_s": round(cpu, 4) if cpu is not None else None})

    @property
    def ok(self) -> int:
        return sum(r.ok for r in self.records)

    def pct(self, p: float, ttft: bool = False) -> float | None:
        if ttft:
            xs = [r.ttft * 1000 for r in self.records if r.ok and r.ttft is not None]
        else:
            xs = [r.latency * 1000 for r in self.records if r.ok]
        return percentile(xs, p)

    @property
    def rps(self) -> float | None:
        return self.ok / self.wall_s if self.wall_s else None

    @property
    def cpu_ms_per_request(self) -> float | None:
        return self.cpu_s / self.ok * 1000 if self.cpu_s is not None and self.ok else None

    @property
    def statements_per_request(self) -> float | None:
        if self.statements is None or not self.statement_requests:
            return None
        return self.statements / self.statement_requests

    @property
    def path_statements_per_request(self) -> float | None:
        if self.path_statements is None or not self.statement_requests:
            return None
        return self.path_statements / self.statement_requests

    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            if not r.ok:
                key = r.error or f"HTTP {r.status}"
                out[key] = out.get(key, 0) + 1
        return out

    def as_dict(self) -> dict:
        return {
            "target": self.target, "requests": len(self.records), "ok": self.ok, "errors": self.errors(),
            "wall_s": round(self.wall_s, 3), "rps": _r(self.rps, 1),
            "latency_ms": {"p50": _r(self.pct(50), 3), "p90": _r(self.pct(90), 3), "p99": _r(self.pct(99), 3)},
            "ttft_ms": {"p50": _r(self.pct(50, True), 3), "p99": _r(self.pct(99, True), 3)},
            "cpu_s": _r(self.cpu_s, 4), "cpu_ms_per_request": _r(self.cpu_ms_per_request, 4),
            "statements": self.statements, "statement_requests": self.statement_requests,
            "statements_per_request": _r(self.statements_per_request, 3),
            "path_statements": self.path_statements,
            "path_statements_per_request": _r(self.path_statements_per_request, 3),
            "warmup_requests": self.warmup_requests, "rounds": self.rounds,
        }


def _r(x: float | None, n: int) -> float | None:
    return None if x is None else round(x, n)


@dataclass(frozen=True)
class Target:
    """A figure to reach: ``figures()[key] <op> limit``."""

    label: str
    key: str
    op: str  # "<=" or ">="
    limit: float
    unit: str = ""

    def check(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value <= self.limit if self.op == "<=" else value >= self.limit


@dataclass
class Result:
    """The common record every scenario returns (one per table row)."""

    scenario: str
    row: str
    params: dict = field(default_factory=dict)
    direct: RunStats | None = None
    gateway: RunStats | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # scenario-specific figures
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, float | None]:
        """Derived figures (computed late: statements are known only after the ledger settles)."""
        f: dict[str, float | None] = {}
        d, g = self.direct, self.gateway
        if g is not None:
            f["cpu_ms_per_request"] = g.cpu_ms_per_request
            f["statements_per_request"] = g.statements_per_request
            f["path_statements_per_request"] = g.path_statements_per_request
        if d is not None and g is not None:
            f["throughput_ratio"] = g.rps / d.rps if d.rps and g.rps is not None else None
            for p in (50, 99):
                f[f"added_p{p}_ms"] = _sub(g.pct(p), d.pct(p))
                f[f"added_ttft_p{p}_ms"] = _sub(g.pct(p, True), d.pct(p, True))
        chunks = self.metrics.get("chunks_per_stream")
        if g is not None and chunks and g.cpu_s is not None and g.ok:
            f["cpu_us_per_chunk"] = g.cpu_s / (g.ok * chunks) * 1e6
        for k, v in self.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                f.setdefault(k, v)
        return f

    def as_dict(self) -> dict:
        figures = self.figures()
        return {
            "scenario": self.scenario, "row": self.row, "params": self.params,
            "direct": self.direct.as_dict() if self.direct else None,
            "gateway": self.gateway.as_dict() if self.gateway else None,
            "metrics": self.metrics,
            "figures": {k: _r(v, 4) for k, v in figures.items()},
            "targets": [{"label": t.label, "key": t.key, "op": t.op, "limit": t.limit, "unit": t.unit,
                         "measured": _r(figures.get(t.key), 4), "met": t.check(figures.get(t.key))}
                        for t in self.targets],
            "notes": self.notes,
        }


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# --- scenarios registry -------------------------------------------------------------------------
@dataclass(frozen=True)
class SimGroup:
    """One simulator configuration; its upstream is published as model ``bench-<name>``."""

    name: str
    args: tuple[str, ...]
    max_concurrency: int  # the gateway's Upstream.max_concurrency for it

    @property
    def model(self) -> str:
        return f"bench-{self.name}"


@dataclass(frozen=True)
class Scenario:
    name: str
    fn: Callable[["Bench"], list[Result]]
    sims: tuple[str, ...] = ()
    members: tuple[str, ...] = ("bench",)
    help: str = ""


SIM_GROUPS: dict[str, SimGroup] = {}
SCENARIOS: dict[str, Scenario] = {}


def sim_group(name: str, *args: str, max_concurrency: int) -> SimGroup:
    SIM_GROUPS[name] = group = SimGroup(name, args, max_concurrency)
    return group


def scenario(name: str, *, sims: tuple[str, ...] = (), members: tuple[str, ...] = ("bench",), help: str = ""):
    """Register a scenario function ``fn(bench) -> list[Result]`` (runs in registration order)."""
    def deco(fn):
        SCENARIOS[name] = Scenario(name, fn, tuple(sims), tuple(members), help or (fn.__doc__ or "").strip())
        return fn
    return deco


# --- PostgreSQL statements ----------------------------------------------------------------------
class StatementLedger:
    """Attributes the bench database's transactions (xact_commit + xact_rollback) to gateway windows.

    With autocommit every statement is one transaction. Backends flush these counters
    to pg_stat_database lazily (at most once a second while busy, ~10 s after going
    idle), so a snapshot is read only once the gateways have been idle for ``settle``
    seconds; the delta since the previous snapshot belongs to the window opened by the
    previous ``begin``. The wait overlaps the direct runs in between. ``settle=0``
    (--quick) skips the wait: the figures are then approximate.
    """

    def __init__(self, db: BenchDatabase, settle: float) -> None:
        self.db, self.settle = db, settle
        self.current: RunStats | None = None
        self.last_activity = time.monotonic()
        self.snapshot = db.transactions()
        self.waited = 0.0

    def activity(self) -> None:
        self.last_activity = time.monotonic()

    def begin(self, stats: RunStats | None) -> None:
        """Before gateway traffic that belongs to stats (None: don't count it)."""
        self._close()
        self.current = stats

    def end(self) -> None:
        self.activity()

    def finish(self) -> None:
        self._close()
        self.current = None

    def _close(self) -> None:
        wait = self.last_activity + self.settle - time.monotonic()
        if wait > 0:
            self.waited += wait
            time.sleep(wait)
        now = self.db.transactions()
        if self.current is not None:
            self.current.statements = (self.current.statements or 0) + now - self.snapshot
        self.snapshot = now


# --- the bench context --------------------------------------------------------------------------
@dataclass
class Timing:
    warmup: float
    duration: float
    rounds: int


class Bench:
    """What a scenario can use: simulators, gateways, keys, timing, and the measurement helpers."""

    def __init__(self, args: argparse.Namespace, procs: Processes, ledger: StatementLedger,
                 sims: dict, keys: dict[str, str], gateways: dict[str, GatewayProcess]) -> None:
        self.args, self.procs, self.ledger = args, procs, ledger
        self.sims, self.keys, self.gateways = sims, keys, gateways
        self.quick: bool = args.quick

    def timing(self, kind: str = "fast") -> Timing:
        """Warm-up / duration / rounds for a kind of scenario ("fast": instant upstream, "paced": GPU-like)."""
        a = self.args
        if kind == "paced":
            t = Timing(1.5, 4.0, 1) if a.quick else Timing(3.0, 8.0, 2)
        else:
            t = Timing(0.5, 2.0, 1) if a.quick else Timing(1.0, 5.0, 2)
        if a.duration:
            t.duration = a.duration
        if a.rounds:
            t.rounds = a.rounds
        return t

    def auth(self, member: str = "bench") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[member]}"}

    def start_gateway(self, name: str, **env: str) -> GatewayProcess:
        gw = self.procs.start_gateway(name, **env)
        self.gateways[name] = gw
        self.ledger.activity()
        return gw

    def stop_gateway(self, name: str) -> None:
        self.procs.stop(self.gateways.pop(name))

    # -- measurement --------------------------------------------------------------------------
    def measure(self, stats: RunStats, url: str, body: dict, *, stream: bool, concurrency: int,
                timing: Timing, headers: dict[str, str] | None = None, gateway: GatewayProcess | None = None,
                path: str = CHAT, stagger: float = 0.0) -> None:
        """One round: warm-up then a measured window on the same connections; adds to stats.

        stagger > 0 starts the closed loops spread over that many seconds (worker k after
        k/concurrency of it), in the warm-up and again in the measured window.
        """
        if gateway is not None:
            self.ledger.begin(stats)
            path_before = gateway.db_statements()
        cpu = gateway.cpu if gateway is not None else None
        try:
            records, wall, cpu_s, warm = _run(_warm_and_measure(url, path, body, headers, stream, concurrency,
                                                                timing.warmup, timing.duration, cpu, stagger))
        finally:
            if gateway is not None:
                self.ledger.end()
        if gateway is not None:
            # Settlements finish just after the responses: give the last ones a moment.
            time.sleep(0.2)
            stats.path_statements = (stats.path_statements or 0) + gateway.db_statements() - path_before
        stats.add_round(records, wall, cpu_s, warm)

    def compare(self, scenario: str, row: str, group: str, body: dict, *, stream: bool, concurrency: int,
                timing: Timing, gateway: str = "main", params: dict | None = None, stagger: float = 0.0) -> Result:
        """Direct vs. gateway, ABBA over timing.rounds rounds, same body (model = the group's model)."""
        sim, gw = self.sims[group], self.gateways[gateway]
        direct, via = RunStats("direct"), RunStats("gateway")
        for i in range(timing.rounds):
            order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
            for target in order:
                if target == "direct":
                    self.measure(direct, sim.root_url, body, stream=stream, concurrency=concurrency, timing=timing,
                                 stagger=stagger)
                else:
                    self.measure(via, gw.url, body, stream=stream, concurrency=concurrency, timing=timing,
                                 headers=self.auth(), gateway=gw, stagger=stagger)
        result = Result(scenario, row, dict(params or {}, concurrency=concurrency, stream=stream,
                                            rounds=timing.rounds, warmup_s=timing.warmup,
                                            duration_s=timing.duration, stagger_s=stagger),
                        direct=direct, gateway=via)
        _progress(result)
        return result

    def count_chunks(self, url: str, body: dict, headers: dict | None = None) -> int:
        """SSE events (``data: ...`` incl. [DONE]) one streamed request delivers to the client."""
        async def go() -> int:
            async with aiohttp.ClientSession() as s:
                async with s.post(url + CHAT, json=body, headers=headers) as resp:
                    raw = await resp.read()
            return raw.count(b"data: ")
        return _run(go())


async def _warm_and_measure(url, path, body, headers, stream, concurrency, warmup, duration, cpu, stagger):
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120),
                                     skip_auto_headers=("User-Agent",)) as session:
        warm = []
        if warmup:
            warm = await run_load(url, path, body, headers=headers, concurrency=concurrency, duration=warmup,
                                  stream=stream, session=session, stagger=stagger)
        c0 = cpu() if cpu else None
        t0 = time.perf_counter()
        records = await run_load(url, path, body, headers=headers, concurrency=concurrency, duration=duration,
                                 stream=stream, session=session, stagger=stagger)
        wall = time.perf_counter() - t0
        cpu_s = cpu() - c0 if cpu else None
    return records, wall, cpu_s, len(warm)


def _run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _progress(result: Result) -> None:
    d, g = result.direct, result.gateway
    f = result.figures()
    line = f"  {result.row:34s} direct {d.rps or 0:8.0f}/s p50 {d.pct(50) or 0:7.2f}ms | gateway {g.rps or 0:8.0f}/s " \
           f"p50 {g.pct(50) or 0:7.2f}ms cpu {g.cpu_ms_per_request or 0:.3f}ms/req"
    if f.get("added_ttft_p50_ms") is not None:
        line += f" +ttft50 {f['added_ttft_p50_ms']:.2f}ms"
    errs = sum(d.errors().values()) + sum(g.errors().values())
    if errs:
        line += f"  ERRORS direct={d.errors()} gateway={g.errors()}"
    print(line, flush=True)


# --- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench import scenarios  # noqa: F401  (registers the scenarios)

    ap = argparse.ArgumentParser(prog="python -m bench",
                                 description="QwenHub gateway vs. direct upstream (the vLLM simulator), side by side.")
    ap.add_argument("--quick", action="store_true", help="a ~2 minute smoke version (1 round, short windows)")
    ap.add_argument("--only", action="append", choices=list(SCENARIOS), metavar="SCENARIO",
                    help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    ap.add_argument("--duration", type=float, help="seconds per measured window (overrides the default)")
    ap.add_argument("--rounds", type=int, help="direct/gateway rounds per row (ABBA order)")
    ap.add_argument("--settle", type=float,
                    help="seconds of gateway idleness before reading pg_stat_database (default 11; 0 with --quick)")
    ap.add_argument("--pin", choices=("auto", "none"), default="auto",
                    help="auto: gateway on the first core, simulators + load generator on the others (taskset)")
    ap.add_argument("--keep-db", action="store_true", help="do not drop qwenhub_bench at the end")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"), help="where to write the JSON results")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)
    if args.settle is None:
        args.settle = 0.0 if args.quick else 11.0
    return args


def _commit() -> str:
    """HEAD when the gateway starts (+ "dirty" if tracked files are modified: the gateway runs the working tree)."""
    root = RESULTS.parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root).stdout.strip()
    except OSError:
        return ""
    return head + ("+dirty" if dirty else "")


def yardstick_us() -> float:
    """This machine's single-core Python speed: µs per `sum(range(1000))`, best of 5 (lower is faster).

    Absolute figures (ms of CPU, added ms) scale with it; compare runs on different machines by it.
    """
    return round(min(timeit.repeat("sum(range(1000))", number=2000, repeat=5)) / 2000 * 1e6, 1)


def _meta(args, pinning: Pinning, started: float, commit: str, yardstick_before: float) -> dict:
    cpu_model = ""
    try:
        cpu_model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1), "commit": commit, "quick": args.quick,
        "machine": f"{cpu_model or platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
        "yardstick_us": [yardstick_before, yardstick_us()],  # at the start and at the end of the run
        "pinning": pinning.describe(),
        "gateway": "1 uvicorn process (uvloop, httptools), DEBUG=false, LOG_LEVEL=WARNING, PostgreSQL + Redis",
        "statements_method": (
            "request path = the gateway's own count (qwenhub_db_statements_total: reservations and "
            "settlements) over each gateway window; all = pg_stat_database xact_commit+xact_rollback delta of qwenhub_bench over each gateway window "
            "(warm-up included; autocommit: 1 statement = 1 transaction), read after "
            f"{args.settle:g} s of gateway idleness" + ("" if args.settle >= 10.5 else " — APPROXIMATE (stats flush lag)")
        ),
    }


def main(argv: list[str] | None = None) -> int:
    from bench import report

    args = parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:14s} {s.help}")
        return 0
    selected = [SCENARIOS[n] for n in SCENARIOS if not args.only or n in args.only]
    groups = [SIM_GROUPS[g] for g in dict.fromkeys(g for s in selected for g in s.sims)]
    members = list(dict.fromkeys(m for s in selected for m in s.members))

    def on_term(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)

    started = time.time()
    yardstick_before = yardstick_us()
    commit = _commit()
    pinning = Pinning.choose(args.pin)
    pinning.pin_self()
    procs = Processes(pinning)
    db: BenchDatabase | None = None
    results: list[Result] = []
    ledger = None
    code = 0
    try:
        print(f"bench: {', '.join(s.name for s in selected)}{' (quick)' if args.quick else ''}; {pinning.describe()}",
              flush=True)
        db = BenchDatabase()
        db.create()
        migrate()
        redis_flush()
        sims = {g.name: procs.start_simulator("--served-model-name", g.model, *g.args) for g in groups}
        world = setup_world({
            "members": members,
            "upstreams": [{"name": g.name, "base_url": sims[g.name].base_url, "served_name": g.model,
                           "public_name": g.model, "max_concurrency": g.max_concurrency} for g in groups],
        })
        gateways = {"main": procs.start_gateway("main")}
        ledger = StatementLedger(db, args.settle)
        bench = Bench(args, procs, ledger, sims, world["keys"], gateways)
        for s in selected:
            print(f"[{s.name}] {s.help}", flush=True)
            results += s.fn(bench)
        ledger.finish()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        code = 130
    except Exception:
        for proc in procs.started:
            if isinstance(proc, GatewayProcess):
                print(f"--- {proc.log_path} (tail) ---\n{proc.log_tail()}", file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        if db is not None:
            try:
                if not args.keep_db:
                    db.drop()
                db.close()
            except Exception as exc:  # noqa: BLE001
                print(f"warning: could not drop the bench database: {exc}", file=sys.stderr)
        try:
            redis_flush()
        except Exception:  # noqa: BLE001
            pass
    if results:
        meta = _meta(args, pinning, started, commit, yardstick_before)
        meta["statement_settle_wait_s"] = round(ledger.waited, 1) if ledger else None
        if code:
            meta["interrupted"] = True
        report.print_report(results, meta)
        path = report.write_json(results, meta, args.out)
        print(f"\nJSON: {path}")
    return code
