"""The benchmark runner: the scenario registry, the measurement loop and main() (figures: bench/figures.py).

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
from dataclasses import dataclass
from typing import Callable

import aiohttp

from bench.figures import Result, RunStats, StatementLedger
from bench.loadgen import run_load
from bench.procs import (RESULTS, BenchDatabase, GatewayProcess, Pinning, Processes, migrate, redis_flush,
                         setup_world)

CHAT = "/v1/chat/completions"
PROMPT = [{"role": "user", "content": "Write a short note about benchmarking an API gateway."}]


def chat_body(model: str, tokens: int, stream: bool) -> dict:
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "ignore_eos": True}
    if stream:
        body["stream"] = True
    return body


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
    gateway: bool = True  # False: the run starts no gateway for it (nor a setup, if no scenario needs one)


SIM_GROUPS: dict[str, SimGroup] = {}
SCENARIOS: dict[str, Scenario] = {}


def sim_group(name: str, *args: str, max_concurrency: int) -> SimGroup:
    SIM_GROUPS[name] = group = SimGroup(name, args, max_concurrency)
    return group


def scenario(name: str, *, sims: tuple[str, ...] = (), members: tuple[str, ...] = ("bench",), help: str = "",
             gateway: bool = True):
    """Register a scenario function ``fn(bench) -> list[Result]`` (runs in registration order).

    What it declares is all the run starts for it: the simulators of `sims`, the `members`
    (with keys, created by the setup subprocess) and, unless ``gateway=False``, the main gateway.
    """
    def deco(fn):
        SCENARIOS[name] = Scenario(name, fn, tuple(sims), tuple(members), help or (fn.__doc__ or "").strip(),
                                   gateway)
        return fn
    return deco


# --- the bench context --------------------------------------------------------------------------
@dataclass
class Timing:
    warmup: float
    duration: float
    rounds: int


class Bench:
    """What a scenario can use: simulators, gateways, keys, timing, and the measurement helpers."""

    def __init__(self, args: argparse.Namespace, procs: Processes, ledger: StatementLedger | None,
                 sims: dict, keys: dict[str, str], gateways: dict[str, GatewayProcess]) -> None:
        self.args, self.procs, self.ledger = args, procs, ledger
        self.sims, self.keys, self.gateways = sims, keys, gateways
        self.quick: bool = args.quick

    def timing(self, kind: str = "fast") -> Timing:
        """Warm-up / duration / rounds for a kind of scenario ("fast": instant upstream, "paced": GPU-like)."""
        a = self.args
        if kind == "paced":
            t = Timing(1.5, 4.0, 1) if a.quick else Timing(3.0, 7.0, 2)
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
    ap.add_argument("--users", type=int, help="soak: simulated users (default 200; 50 with --quick)")
    ap.add_argument("--seconds", type=float, help="soak: seconds of load (default 120; 30 with --quick)")
    ap.add_argument("--keep-db", action="store_true", help="do not drop qwenhub_bench at the end")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"), help="where to write the JSON results")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)
    if args.users is None:
        args.users = 50 if args.quick else 200
    if args.seconds is None:
        args.seconds = 30.0 if args.quick else 120.0
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
    need_gateway = any(s.gateway for s in selected)

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
        keys: dict[str, str] = {}
        if members or groups or need_gateway:
            keys = setup_world({
                "members": members,
                "upstreams": [{"name": g.name, "base_url": sims[g.name].base_url, "served_name": g.model,
                               "public_name": g.model, "max_concurrency": g.max_concurrency} for g in groups],
            })["keys"]
        gateways = {"main": procs.start_gateway("main")} if need_gateway else {}
        ledger = StatementLedger(db, args.settle) if need_gateway else None
        bench = Bench(args, procs, ledger, sims, keys, gateways)
        for s in selected:
            print(f"[{s.name}] {s.help}", flush=True)
            results += s.fn(bench)
        if ledger is not None:
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
        if not need_gateway:
            meta["gateway"] = "none (no selected scenario needs one)"
        meta["statement_settle_wait_s"] = round(ledger.waited, 1) if ledger else None
        if code:
            meta["interrupted"] = True
        report.print_report(results, meta)
        path = report.write_json(results, meta, args.out)
        print(f"\nJSON: {path}")
    return code
