"""Process management for the benchmark: PostgreSQL database, Redis, simulators, gateways.

Everything the benchmark starts is registered with a ``Processes`` object, whose
``stop_all()`` (called from a ``finally`` in the runner, also on Ctrl-C / SIGTERM)
stops it: gateways are started in their own session and killed as a process group;
simulators exit on SIGTERM (and on their stdin closing if this process dies).

Nothing here imports Django: the bench process never opens a connection to the
bench database itself (its statements would count against the gateway's). The
setup (team, members, keys, upstreams) runs in a subprocess: ``python -m bench.procs setup``;
so do the `close` scenario's data and measurement (``python -m bench.closedata``, via ``django_json``).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

DB_NAME = "qwenhub_bench"
PG_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"
DATABASE_URL = f"postgres://postgres@127.0.0.1:5432/{DB_NAME}"
REDIS_URL = "redis://127.0.0.1:6379/9"


# --- CPU accounting and pinning -----------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass(frozen=True)
class Pinning:
    """Which cores the gateway gets, and which the simulators + load generator share."""

    gateway: tuple[int, ...] = ()
    client: tuple[int, ...] = ()

    @classmethod
    def choose(cls, mode: str) -> "Pinning":
        cpus = sorted(os.sched_getaffinity(0))
        if mode == "none" or len(cpus) < 2 or not shutil.which("taskset"):
            return cls()
        # gateway alone on the first core; simulator(s) and load generator on the rest
        return cls(gateway=(cpus[0],), client=tuple(cpus[1:]))

    @staticmethod
    def prefix(cores: tuple[int, ...]) -> list[str]:
        return ["taskset", "-c", ",".join(map(str, cores))] if cores else []

    def pin_self(self) -> None:
        if self.client:
            os.sched_setaffinity(0, set(self.client))

    def describe(self) -> str:
        if not self.gateway:
            return "not pinned"
        return f"gateway on core {','.join(map(str, self.gateway))}; simulator + load generator on core(s) " \
               f"{','.join(map(str, self.client))}; PostgreSQL and Redis unpinned"


# --- PostgreSQL ---------------------------------------------------------------------------------
class BenchDatabase:
    """Creates and drops qwenhub_bench; reads its transaction counters from the `postgres` database."""

    def __init__(self, admin_url: str = PG_ADMIN_URL, name: str = DB_NAME) -> None:
        import psycopg

        self.name = name
        self.url = DATABASE_URL if name == DB_NAME else admin_url.rsplit("/", 1)[0] + "/" + name
        self._admin = psycopg.connect(admin_url.replace("postgres://", "postgresql://"), autocommit=True)

    def create(self) -> None:
        self.drop()
        self._admin.execute(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        self._admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def transactions(self) -> int:
        """xact_commit + xact_rollback of the bench database (flushed by backends with a lag of up to ~10 s)."""
        row = self._admin.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", [self.name]
        ).fetchone()
        return int(row[0]) if row else 0

    def connections(self) -> int:
        """Backends connected to the bench database now (pg_stat_activity)."""
        row = self._admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [self.name]).fetchone()
        return int(row[0])

    def close(self) -> None:
        self._admin.close()


def redis_flush(url: str = REDIS_URL) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def bench_env(**extra: str) -> dict[str, str]:
    """The environment of every Django process of the benchmark: production settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QWENHUB_", "DJANGO_"))}
    env.update({
        "DEBUG": "false",
        "SECRET_KEY": _SECRET_KEY,
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": REDIS_URL,
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "qwenhub.settings",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


_SECRET_KEY = secrets.token_urlsafe(50)


def migrate() -> None:
    subprocess.run([PY, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=bench_env(), check=True)


def setup_world(spec: dict) -> dict:
    """Run `python -m bench.procs setup` (Django, bench env) and return what it printed."""
    out = subprocess.run([PY, "-m", "bench.procs", "setup", json.dumps(spec)], cwd=ROOT, env=bench_env(),
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def django_json_main(module: str, argv: list[str], commands: dict) -> int:
    """django_json's other end: run commands[argv[1]](spec) under Django and print its result as JSON."""
    if len(argv) != 3 or argv[1] not in commands:
        print(f"usage: python -m {module} {'|'.join(commands)} '<json spec>'", file=sys.stderr)
        return 2
    import django

    django.setup()
    from django.db import connection

    out = commands[argv[1]](json.loads(argv[2]))
    connection.close()
    print(json.dumps(out, default=str))
    return 0


def django_json(module: str, command: str, spec: dict) -> dict:
    """Run `python -m <module> <command> '<json spec>'` (Django, bench env; stderr passes through): its last line."""
    out = subprocess.run([PY, "-m", module, command, json.dumps(spec)], cwd=ROOT, env=bench_env(), check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _setup_main(spec: dict) -> dict:
    """In a subprocess with the bench env: a team, unlimited members with keys, upstreams + routes."""
    import django

    django.setup()
    from django.db import connection

    from proxy.services import upstream_add
    from tenants.services import api_key_issue, member_add, team_create

    team = team_create(slug="bench", name="Benchmark", timezone_name="UTC", currency="CNY", monthly_cost="3000")
    keys = {}
    for username in spec["members"]:
        # request_quota / token_quota None = unlimited; rate limits are null by default (none)
        member = member_add(team=team, username=username, request_quota=None, token_quota=None)
        keys[username] = api_key_issue(member=member, label="bench")[1]
    for up in spec["upstreams"]:
        upstream_add(name=up["name"], base_url=up["base_url"], served_name=up["served_name"],
                     public_name=up["public_name"], max_concurrency=up["max_concurrency"])
    connection.close()
    return {"keys": keys}


# --- processes ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class GatewayProcess:
    """`uvicorn qwenhub.asgi:application` (one process, or a master and `workers`) with the bench env, in its own
    process group."""

    def __init__(self, name: str, prefix: list[str], log_dir: Path, *, workers: int = 1, **env: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"gateway-{name}.log"
        self._log = open(self.log_path, "wb")
        cmd = [*prefix, PY, "-m", "uvicorn", "qwenhub.asgi:application", "--host", "127.0.0.1",
               "--port", str(self.port), "--no-access-log", "--loop", "uvloop", "--http", "httptools",
               "--lifespan", "on", *(["--workers", str(workers)] if workers > 1 else [])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=bench_env(**env), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid  # taskset execs, so this is the Python process itself
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway {name} exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            if http_status(self.url + "/v1/models") is not None:  # 401 without a key: it answers
                self.started_at = time.monotonic()
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gateway {name} did not start; see {self.log_path}")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def db_statements(self) -> float:
        """The request-path database statements this gateway has counted (its /metrics, from loopback)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == "qwenhub_db_statements_total")

    def log_tail(self, n: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


@dataclass
class Processes:
    """Everything started for one benchmark run, stopped in reverse order by stop_all()."""

    pinning: Pinning
    log_dir: Path = RESULTS / "logs"
    started: list = field(default_factory=list)

    def start_simulator(self, *args: str):
        from proxy.simulator.testing import start_simulator

        sim = start_simulator(*args, "--log-level", "error", prefix=Pinning.prefix(self.pinning.client))
        self.started.append(sim)
        return sim

    def start_gateway(self, name: str, *, workers: int = 1, prefix: list[str] | None = None,
                      **env: str) -> GatewayProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        prefix = Pinning.prefix(self.pinning.gateway) if prefix is None else prefix
        gw = GatewayProcess(name, prefix, self.log_dir, workers=workers, **env)
        self.started.append(gw)
        return gw

    def stop(self, proc) -> None:
        proc.stop()
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        while self.started:
            proc = self.started.pop()
            try:
                proc.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"warning: could not stop {proc!r}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "setup":
        print(json.dumps(_setup_main(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m bench.procs setup '<json spec>'")
