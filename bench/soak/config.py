"""The soak's load, its bounds, and what one soak measured."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

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


@dataclass
class Soak:
    """What one soak measured (figures) and its checks (name -> (passed, detail))."""

    config: Config
    figures: dict = field(default_factory=dict)
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for ok, _ in self.checks.values())

