"""End-to-end fixtures: the simulator and the gateway as real processes on loopback.

The gateway runs under uvicorn in a subprocess against pytest-django's test
database and the test Redis, so tests that use it need committed data:
`transactional_db` (the `world` fixture asks for it).
"""
import itertools
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from django.conf import settings

from proxy.simulator.testing import start_simulator

ROOT = Path(__file__).resolve().parents[3]
MODEL = "qwen2.5-7b-instruct"
SERVED = "Qwen2.5-7B-Instruct"
_names = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def database_url() -> str:
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class GatewayProcess:
    """`uvicorn qwenhub.asgi:application` on a free port, logging to a file."""

    def __init__(self, log_dir: Path, *, workers: int = 1, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"gateway-{self.port}.log"
        full_env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "SECRET_KEY": "test-only-not-secret",
            "DEBUG": "false",
            "LOG_LEVEL": "DEBUG",
            "QWENHUB_ROUTES_CACHE_SECONDS": "0",
            "QWENHUB_KEY_CACHE_SECONDS": "1",
            "QWENHUB_UPSTREAM_TIMEOUT": "3",
            "QWENHUB_HEALTH_INTERVAL": "0.5",
            # the tests send many bad keys from one address; test_auth.py tests the limit itself
            "QWENHUB_BAD_KEYS_PER_MINUTE": "100000",
            **env,
        }
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "qwenhub.asgi:application", "--host", "127.0.0.1",
             "--port", str(self.port), "--no-access-log", "--lifespan", "on", "--workers", str(workers)],
            cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            try:
                httpx.get(self.url + "/v1/models", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("gateway did not start")

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def sim():
    with start_simulator("--model", SERVED) as handle:
        yield handle


@pytest.fixture(scope="session")
def embed_sim():
    """An embedding model (vLLM's pooling runner): generative models refuse /v1/embeddings."""
    with start_simulator("--model", "BAAI/bge-m3", "--runner", "pooling") as handle:
        yield handle


@pytest.fixture(scope="session")
def gateway(django_db_setup, tmp_path_factory):
    process = GatewayProcess(tmp_path_factory.mktemp("gateway"))
    yield process
    process.stop()


@dataclass
class World:
    """A team with one member and key, and an upstream (the simulator) serving MODEL."""

    gateway: GatewayProcess
    team: object
    member: object
    key: str
    upstream: object
    extra: dict = field(default_factory=dict)

    def client(self, key: str | None = None, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 20)
        return openai.OpenAI(base_url=self.gateway.url + "/v1", api_key=key or self.key, **kwargs)

    def async_client(self, key: str | None = None, **kwargs) -> openai.AsyncOpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 20)
        return openai.AsyncOpenAI(base_url=self.gateway.url + "/v1", api_key=key or self.key, **kwargs)

    def add_member(self, username: str | None = None, **quotas):
        from tenants.services import api_key_issue, member_add

        member = member_add(team=self.team, username=username or f"m{next(_names)}", **quotas)
        _, raw = api_key_issue(member=member, label="test")
        return member, raw


def make_world(gateway: GatewayProcess, upstream_url: str, **member_kwargs) -> World:
    from proxy.services import upstream_add
    from tenants.services import api_key_issue, member_add, team_create

    n = next(_names)
    team = team_create(slug=f"team-{n}", name=f"Team {n}", timezone_name="Asia/Shanghai",
                       currency="CNY", monthly_cost="3000")
    member = member_add(team=team, username=f"user-{n}", email=f"user{n}@example.org", **member_kwargs)
    _, raw = api_key_issue(member=member, label="test")
    upstream = upstream_add(name=f"up-{n}", base_url=upstream_url, served_name=SERVED, public_name=MODEL,
                            aliases=["qwen"], max_concurrency=64)
    return World(gateway=gateway, team=team, member=member, key=raw, upstream=upstream)


@pytest.fixture
def world(transactional_db, gateway, sim) -> World:
    return make_world(gateway, sim.base_url)


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    """Poll until predicate() is truthy (usage rows are written just after the response)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
