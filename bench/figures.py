"""The benchmark's figures: what one target of one row measured (RunStats), a row's comparison
and targets (Result, Target), and the ledger that attributes PostgreSQL statements to windows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import Record, percentile
from bench.procs import BenchDatabase


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
