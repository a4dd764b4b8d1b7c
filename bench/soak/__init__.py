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

The package: ``config`` (the load and the bounds), ``probes`` (the private Redis, RSS, keys),
``users`` (the simulated users and the sampler), ``run`` (``run_soak``), ``checks`` (figures,
``evaluate``, the Result and its printout), ``data`` (the Django side, ``python -m bench.soak``).
"""
from bench.soak.checks import evaluate, print_soak, result
from bench.soak.config import DB_NAME, Config, Soak
from bench.soak.probes import redis_keys
from bench.soak.run import migrate, run_soak

__all__ = ["DB_NAME", "Config", "Soak", "evaluate", "migrate", "print_soak", "redis_keys", "result", "run_soak"]
