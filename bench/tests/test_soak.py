"""The soak at a tiny scale (10 users, 8 s): every check passes on the real thing, and each can fail.

The soak runs in its own databases (named after the test database's server URL, created
here from a migrated template and dropped at the end), with its own redis-server,
simulator and 2-worker gateway, exactly as ``python -m bench --only soak`` runs it.
"""
import copy
import os
import uuid

import psycopg
import pytest
import redis

from bench import soak
from bench.procs import BenchDatabase, Pinning, Processes

BASE_URL = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/qwenhub")
ADMIN_URL = BASE_URL.rsplit("/", 1)[0] + "/postgres"
PREFIX = BASE_URL.rsplit("/", 1)[1] + "_soak"
TINY = soak.Config(users=10, seconds=8, think_s=0.3)


def _admin():
    return psycopg.connect(ADMIN_URL.replace("postgres://", "postgresql://"), autocommit=True)


@pytest.fixture(scope="module")
def template():
    """A migrated database to copy: migrating once serves both runs."""
    db = BenchDatabase(ADMIN_URL, f"{PREFIX}_template")
    db.create()
    try:
        soak.migrate(db)
        db.close()
        yield db.name
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')


def _soak(template: str, name: str, tmp_path, cfg: soak.Config, sim_args: tuple = ()) -> soak.Soak:
    with _admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    db = BenchDatabase(ADMIN_URL, name)
    procs = Processes(Pinning(), log_dir=tmp_path)
    try:
        return soak.run_soak(cfg, db=db, procs=procs, sim_args=sim_args, progress=lambda *a: None)
    finally:
        procs.stop_all()
        db.drop()
        db.close()


@pytest.fixture(scope="module")
def tiny(template, tmp_path_factory) -> soak.Soak:
    return _soak(template, f"{PREFIX}_run", tmp_path_factory.mktemp("soak"), TINY)


def test_tiny_soak_passes_every_check(tiny):
    f = tiny.figures
    assert tiny.passed, {name: detail for name, (ok, detail) in tiny.checks.items() if not ok}
    assert len(tiny.checks) == 8
    assert f["requests"] > 30 and f["unexpected"] == 0 and f["disconnects"] > 0
    assert all(n > 0 for n in f["quota_429_per_quota_member"])  # both members ran out: 429 insufficient_quota
    assert f["gateway_processes"] >= 3  # the uvicorn master and its 2 workers
    assert f["usage_rows_by_status"]["rejected"] == sum(f["quota_429_per_quota_member"])
    # every client that left mid-stream was settled by the gateway as such, and its upstream request aborted
    assert f["usage_rows_by_status"]["client_disconnected"] == f["disconnects"] <= f["upstream_aborted"]
    assert f["reservations_left"] == 0 and f["reconcile_rc"] == 0
    assert f["redis_keys_max"] > 0 and f["redis_keys_without_ttl"] == []  # the limiter's and the queue's keys
    assert 100 < f["rss_before_mb"] < 2000 and 0 < f["pg_connections_before"] <= f["pg_connections_max"]


@pytest.mark.parametrize("change, failing", [
    ({"unexpected": 1, "unexpected_examples": ["json user 3: HTTP 502"]}, "statuses: only the intended 429s"),
    ({"quota_429_per_quota_member": [0, 4]}, "statuses: only the intended 429s"),
    ({"gateway_log_errors": ["ERROR internal error request_id=req_x"]}, "statuses: only the intended 429s"),
    ({"rss_after_mb": "+100"}, "gateway RSS steady"),
    ({"pg_connections_max": 99}, "PostgreSQL connections steady and bounded"),
    ({"pg_connections_after": "+10"}, "PostgreSQL connections steady and bounded"),
    ({"redis_keys_after": "x3"}, "Redis keys steady"),
    ({"redis_keys_without_ttl": ["qh:fq:{1}:held"]}, "every Redis key has a TTL"),
    ({"reservations_left": 2}, "no reservation left for the sweep"),
    ({"reconcile_rc": 1, "reconcile_output": "MISMATCH soak-003 tokens_used"}, "manage.py reconcile clean"),
    ({"usage_mismatches": 1}, "one usage row per admitted request"),
    ({"admitted": "+1"}, "one usage row per admitted request"),
])
def test_each_check_fails_on_what_it_guards(tiny, change, failing):
    f = copy.deepcopy(tiny.figures)
    for key, value in change.items():
        if isinstance(value, str) and value[:1] in "+x" and isinstance(f[key], (int, float)):
            value = f[key] + float(value[1:]) if value[0] == "+" else f[key] * float(value[1:]) + 100
        f[key] = value
    checks = soak.evaluate(f)
    assert [name for name, (ok, _) in checks.items() if not ok] == [failing]


def test_a_faulty_upstream_fails_the_statuses_check(template, tmp_path):
    """The simulator answers 500 to everything: the gateway's errors are counted, the check fails."""
    out = _soak(template, f"{PREFIX}_fault", tmp_path, soak.Config(users=4, seconds=3, think_s=0.2),
                sim_args=("--fault", "500"))
    ok, detail = out.checks["statuses: only the intended 429s"]
    assert not ok and out.figures["unexpected"] > 0 and "UNEXPECTED" in detail
    assert not out.passed
    assert out.checks["manage.py reconcile clean"][0]  # failed requests are settled as well


def test_redis_keys_lists_the_keys_without_a_ttl():
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12"))
    forever, expiring = f"soak-test:{uuid.uuid4().hex}:forever", f"soak-test:{uuid.uuid4().hex}:expiring"
    try:
        client.set(forever, 1)
        client.set(expiring, 1, ex=60)
        count, no_ttl = soak.redis_keys(client)
        assert count >= 2 and forever in no_ttl and expiring not in no_ttl
    finally:
        client.delete(forever, expiring)
        client.close()
