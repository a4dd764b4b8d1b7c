"""Faults against live processes: the gateway under uvicorn with 2 workers, the real openai SDK and httpx as
clients, the simulator as the upstream, and a private redis-server and PostgreSQL cluster that are stopped
and started again under traffic.

After each fault `manage.py reconcile TEAM` is clean: every admitted request has exactly one usage row
(none lost, none doubled), the quota counters agree with the rows, reservations and Redis concurrency
slots are back to 0. A settlement that finds the database gone is kept by the worker and written once
the database is back. Where a process died (a worker killed; a reservation committed as its connection
died), what it had reserved is given back only by the sweep, once the reservation is older than the
longest possible request (here backdated), and reconcile is clean after it.

What the clients saw is in each test's docstring.
"""
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from io import StringIO

import httpx
import openai
import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from billing.models import UsageRecord
from proxy.gateway import errors
from proxy.gateway.tests.conftest import (  # noqa: F401 - sim is a fixture
    MODEL, ROOT, SERVED, GatewayProcess, free_port, make_world, sim, wait_for)
from proxy.gateway.tests.private_services import private_postgres, private_redis
from proxy.simulator.testing import start_simulator
from tenants.models import QuotaCounter, QuotaReservation
from tenants.services.reservations import reservations_sweep

MESSAGES = [{"role": "user", "content": "Count to three."}]
UPSTREAM_TIMEOUT = 2  # the gateway's QWENHUB_UPSTREAM_TIMEOUT here: a hung upstream costs this long
# The gateway on the private PostgreSQL uses this db of the private Redis: its ids overlap the test database's.
PG_REDIS_DB = 1


@pytest.fixture(scope="module")
def redis():
    with private_redis() as server:
        yield server


@pytest.fixture(scope="module")
def faulty():
    """A simulator of this module's own, whose faults are switched by the tests."""
    with start_simulator("--model", SERVED) as handle:
        yield handle


@pytest.fixture(autouse=True)
def _no_fault(request):
    yield
    if "faulty" in request.fixturenames:
        request.getfixturevalue("faulty").control(fault=None)


@pytest.fixture(scope="module")
def gw(django_db_setup, tmp_path_factory, redis):
    """Two uvicorn workers on the test database and the private Redis."""
    process = GatewayProcess(tmp_path_factory.mktemp("faults"), workers=2, REDIS_URL=redis.url(),
                             QWENHUB_UPSTREAM_TIMEOUT=str(UPSTREAM_TIMEOUT))
    yield process
    process.stop()


def _limited_world(gateway, upstream_url, **quotas):
    """A world whose member has rate limits, so that every request takes (and gives back) a Redis slot."""
    world = make_world(gateway, upstream_url, **quotas)
    world.member.requests_per_minute = 100_000
    world.member.max_concurrent_requests = 50
    world.member.save(update_fields=["requests_per_minute", "max_concurrent_requests"])
    return world


def _reconcile_clean(slug: str) -> None:
    out = StringIO()
    try:
        call_command("reconcile", slug, stdout=out)
    except CommandError as exc:
        pytest.fail(f"reconcile is not clean: {exc}\n{out.getvalue()}")
    assert "the counters agree with the usage rows" in out.getvalue()


def _rows(member, count: int) -> list:
    """The member's usage rows, once `count` are written (and a moment later, to catch any extra)."""
    rows = UsageRecord.objects.filter(member=member)
    wait_for(lambda: rows.count() >= count, timeout=10)
    time.sleep(0.2)
    return list(rows.order_by("started_at"))


def _assert_one_row_each(member, request_ids: list[str]) -> list:
    rows = _rows(member, len(request_ids))
    assert sorted(r.request_id for r in rows) == sorted(request_ids)  # none lost, none doubled, none unknown
    return rows


def _assert_settled(world, redis=None) -> None:
    counter = QuotaCounter.objects.get(member=world.member)
    assert (counter.requests_reserved, counter.tokens_reserved) == (0, 0)
    assert not QuotaReservation.objects.filter(counter=counter).exists()
    if redis is not None:
        assert redis.cli("ZCARD", f"qh:rl:{world.member.pk}:c") == "0"  # no concurrency slot held
    _reconcile_clean(world.team.slug)


def _ok(client: openai.OpenAI, stream: bool) -> str:
    """One successful request through the gateway; its request id."""
    if stream:
        response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in response if c.choices)
        return response.response.headers["x-request-id"]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    assert raw.parse().usage.completion_tokens == 5
    return raw.headers["x-request-id"]


# --- 1. the upstream refuses, hangs or answers garbage ---------------------------------------------

# fault, stream, what the client gets (an HTTP status, or "event": a 200 stream ending in the error event),
# the error code, the usage row's status
UPSTREAM_FAULTS = [
    ("no_listener", False, 503, "upstream_unavailable", "upstream_unavailable"),
    ("refuse", False, 503, "upstream_unavailable", "upstream_unavailable"),
    ("refuse", True, 503, "upstream_unavailable", "upstream_unavailable"),
    ("hang", False, 504, "upstream_timeout", "upstream_timeout"),
    ("hang", True, 504, "upstream_timeout", "upstream_timeout"),
    ("garbage", False, 502, "bad_gateway", "upstream_error"),
    ("html_502", False, 502, "bad_gateway", "upstream_error"),
    ("html_502", True, 502, "bad_gateway", "upstream_error"),
    ("cut", True, "event", 502, "upstream_error"),
    ("huge_line", False, 502, "bad_gateway", "upstream_error"),
    ("huge_line", True, "event", 502, "upstream_error"),
]


@pytest.mark.parametrize(("fault", "stream", "answer", "code", "row_status"), UPSTREAM_FAULTS,
                         ids=[f"{f[0]}-{'stream' if f[1] else 'json'}" for f in UPSTREAM_FAULTS])
def test_an_upstream_fault_is_a_clear_error_settled_once(transactional_db, gw, redis, faulty, fault, stream,
                                                          answer, code, row_status):
    """Each upstream fault is one clear error in OpenAI's shape, one usage row, and the gateway serves on.

    What the openai SDK (max_retries=0) raised:
    - nothing listening (connection refused), or `refuse` (the upstream accepts, then closes without a
      response): 503 `upstream_unavailable`, openai.InternalServerError, stream or not;
    - `hang` (nothing sent): after QWENHUB_UPSTREAM_TIMEOUT (2 s here), 504 `upstream_timeout`,
      openai.InternalServerError, stream or not (no status line had been sent);
    - `garbage` (200 with a non-JSON body), `html_502` (nginx's HTML 502 page), `huge_line` not streamed
      (a 10 MB line without a newline, then close): 502 `bad_gateway`, openai.InternalServerError;
    - a stream `cut` midway (no [DONE]) or broken by a 10 MB line without a newline: a 200 stream that ends
      with the error event {"error": {"message": "The model server for `…` stopped in the middle of the
      response.", "type": "upstream_error", "code": 502}} and [DONE]: openai.APIError (the base class, not
      APIConnectionError) while iterating.
    The row says upstream_unavailable / upstream_timeout / upstream_error; reconcile is clean.
    """
    url = f"http://127.0.0.1:{free_port()}/v1" if fault == "no_listener" else faulty.base_url
    world = _limited_world(gw, url)
    client = world.client()
    if fault != "no_listener":
        faulty.control(fault=fault)
    started = time.monotonic()
    if answer == "event":
        response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50, stream=True)
        assert response.response.status_code == 200
        request_ids = [response.response.headers["x-request-id"]]
        with pytest.raises(openai.APIError) as failed:
            for _ in response:
                pass
        assert type(failed.value) is openai.APIError  # the error event, not a broken connection
        assert failed.value.message == errors.UPSTREAM_STREAM_BROKEN.format(model=MODEL)
    else:
        with pytest.raises(openai.APIStatusError) as failed:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50, stream=stream)
        error = failed.value
        assert isinstance(error, openai.InternalServerError)
        assert error.status_code == answer and error.code == code
        assert error.response.headers["content-type"] == "application/json"
        assert set(error.body) == {"message", "type", "param", "code"} and error.body["message"]
        request_ids = [error.response.headers["x-request-id"]]
    elapsed = time.monotonic() - started
    if fault == "hang":
        assert UPSTREAM_TIMEOUT - 0.1 <= elapsed < UPSTREAM_TIMEOUT + 3
    else:
        assert elapsed < UPSTREAM_TIMEOUT  # never waits for the timeout

    [row] = _rows(world.member, 1)
    assert (row.request_id, row.status, row.http_status) == (request_ids[0], row_status, 502 if answer == "event"
                                                             else answer)
    assert row.completion_tokens < 50  # never the max_tokens, never the garbage
    _assert_settled(world, redis)

    # the gateway serves on: the fault gone, both kinds of request succeed on the same upstream
    if fault == "no_listener":
        from proxy.models import Upstream

        Upstream.objects.filter(pk=world.upstream.pk).update(base_url=faulty.base_url)
    faulty.control(fault=None)
    for i in range(4):
        request_ids.append(_ok(client, stream=bool(i % 2)))
    rows = _assert_one_row_each(world.member, request_ids)
    assert [r.status for r in rows].count("ok") == 4
    _assert_settled(world, redis)


# --- traffic in the background -----------------------------------------------------------------

@dataclass
class Result:
    started: float  # time.monotonic()
    seconds: float
    status: int
    code: str | None
    request_id: str | None


class Traffic:
    """`concurrency` clients sending chat requests one after another, in a thread, until stopped or `total`."""

    def __init__(self, url: str, key: str, *, concurrency: int = 4, total: int | None = None, **body) -> None:
        self.url, self.key, self.concurrency, self.total = url, key, concurrency, total
        self.body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, **body}
        self.results: list[Result] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the traffic did not stop"

    def wait_sent(self, n: int, timeout: float = 30) -> None:
        assert wait_for(lambda: len(self.results) >= n, timeout=timeout), f"{len(self.results)} of {n} answered"

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=self.concurrency)) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.concurrency)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set() and (self.total is None or self.sent < self.total):
            self.sent += 1
            started = time.monotonic()
            try:
                response = await client.post(self.url + "/v1/chat/completions", json=self.body,
                                             headers={"Authorization": f"Bearer {self.key}"})
            except httpx.HTTPError as exc:
                self.results.append(Result(started, time.monotonic() - started, 0, repr(exc), None))
                continue
            code = None
            if response.status_code != 200:
                code = (response.json().get("error") or {}).get("code")
            self.results.append(Result(started, time.monotonic() - started, response.status_code, code,
                                       response.headers.get("x-request-id")))


# --- 2. Redis stopped and started again ------------------------------------------------------------

def test_redis_stopped_and_restarted_during_traffic(transactional_db, gw, redis, sim):
    """Redis goes away under 4 concurrent clients and comes back: no 5xx, the request quota exact, Redis used again.

    The clients (httpx) saw only 200s and, once the quota of 60 requests was used, 429 `insufficient_quota`;
    no 5xx and no connection error, before, during and after the outage. The gateway logged "Redis
    unavailable", kept rate limits per process meanwhile, and wrote its rate-limit state to the restarted
    (empty) Redis again within its 5 s retry interval, without a restart.
    """
    quota = 60
    world = _limited_world(gw, sim.base_url, request_quota=quota)
    member_keys = f"qh:rl:{world.member.pk}:*"
    total = quota + 40
    with Traffic(gw.url, world.key, concurrency=4, total=total) as traffic:
        traffic.wait_sent(15)
        assert redis.cli("--scan", "--pattern", member_keys)  # limits live in Redis
        redis.stop()
        outage = len(traffic.results)
        traffic.wait_sent(outage + 25)
        redis.start()
        restarted_at = len(traffic.results)
        traffic.wait_sent(total)
    assert restarted_at - outage >= 25 and total - restarted_at >= 10  # answered during and after the outage
    assert "Redis unavailable" in gw.log_text()
    statuses = [r.status for r in traffic.results]
    assert set(statuses) <= {200, 429}, [r for r in traffic.results if r.status not in (200, 429)]
    assert statuses.count(200) == quota  # not one more, not one less
    assert {r.code for r in traffic.results if r.status == 429} == {"insufficient_quota"}

    # Redis is used again: the member's rate-limit state reappears in the empty, restarted Redis
    client = world.client()
    request_ids = [r.request_id for r in traffic.results]

    def back_in_redis() -> bool:
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
        assert refused.value.code == "insufficient_quota"
        request_ids.append(refused.value.response.headers["x-request-id"])
        return bool(redis.cli("--scan", "--pattern", member_keys))

    assert wait_for(back_in_redis, timeout=15, interval=0.2), "the gateway did not go back to Redis"
    rows = _assert_one_row_each(world.member, request_ids)
    assert sum(r.status == "ok" for r in rows) == quota
    counter = QuotaCounter.objects.get(member=world.member)
    assert counter.requests_used == quota
    _assert_settled(world, redis)


# --- 3. PostgreSQL stopped and started again -----------------------------------------------------

def _manage(database_url: str, redis_url: str, *args: str) -> str:
    """`manage.py *args` in a subprocess on another database; its stdout."""
    env = {**os.environ, "DATABASE_URL": database_url, "SECRET_KEY": "test-only-not-secret", "DEBUG": "false",
           "REDIS_URL": redis_url}
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"manage.py {args[0]} failed ({done.returncode}): {done.stdout}{done.stderr}"
    return done.stdout


WORLD_SCRIPT = """
import json
from django.core.management import call_command
call_command("migrate", verbosity=0)
from proxy.services import upstream_add
from tenants.services import api_key_issue, member_add, team_create
team = team_create(slug="pg-team", name="PG team", timezone_name="Asia/Shanghai", currency="CNY", monthly_cost="3000")
member = member_add(team=team, username="pg-user", email="pg@example.org")
_, raw = api_key_issue(member=member, label="test")
upstream_add(name="pg-up", base_url={url!r}, served_name={served!r}, public_name={model!r}, max_concurrency=64)
print("WORLD " + json.dumps({{"slug": team.slug, "key": raw, "member_id": member.pk}}))
"""

# reconcile (dirty: the reservations are stale), the sweep, reconcile again (clean)
SWEEP_SCRIPT = """
import json
from io import StringIO
from django.core.management import CommandError, call_command
from tenants.services.reservations import reservations_sweep
before = StringIO()
try:
    call_command("reconcile", {slug!r}, stdout=before)
except CommandError:
    pass
else:
    raise SystemExit("reconcile was clean with stale reservations")
swept = reservations_sweep()
after = StringIO()
call_command("reconcile", {slug!r}, stdout=after)
print("SWEPT " + json.dumps({{"before": before.getvalue(), "swept": swept, "after": after.getvalue()}}))
"""


def _tagged(out: str, tag: str):
    return json.loads(next(line for line in out.splitlines() if line.startswith(tag + " "))[len(tag) + 1:])


def test_postgresql_stopped_and_started_again_during_traffic(redis, tmp_path):
    """PostgreSQL stopped (fast mode) under traffic: fast 503s, then 200s again once it is back, no restart.

    The clients saw:
    - a stream that had begun before the stop (its reservation committed) went on to the end, a complete
      200 with [DONE]: its settlement found the database gone, so the worker kept it ("usage kept until
      the database is back") and wrote it once PostgreSQL was back: one usage row, its reservation released;
    - while the database was down: 503 `database_unavailable` (openai.InternalServerError; the SDK would
      retry it), each answered within a second or two, none hanging, and nothing else (no 500);
    - once it was started again: 200s, from the same two workers.
    Every answered request has exactly one usage row. A 503 whose reservation committed as the connection
    died may leave a reservation: after the sweep (reservations backdated past the longest possible
    request), reconcile, run on the private cluster, is clean.
    """
    with private_postgres() as pg, start_simulator("--model", SERVED, "--itl-ms", "40") as slow:
        pg.createdb("qh")
        url, redis_url = pg.url("qh"), redis.url(PG_REDIS_DB)
        script = WORLD_SCRIPT.format(url=slow.base_url, served=SERVED, model=MODEL)
        world = _tagged(_manage(url, redis_url, "shell", "-c", script), "WORLD")
        gateway = GatewayProcess(tmp_path, workers=2, DATABASE_URL=url,
                                 REDIS_URL=redis_url,
                                 QWENHUB_UPSTREAM_TIMEOUT=str(UPSTREAM_TIMEOUT))
        try:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=world["key"], max_retries=0, timeout=20)
            workers = _workers(gateway.proc.pid)
            with Traffic(gateway.url, world["key"], concurrency=2) as traffic:
                traffic.wait_sent(6)
                assert {r.status for r in traffic.results} == {200}
                in_flight = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40,
                                                           stream=True)
                chunks = [next(iter(in_flight))]  # streaming: its reservation is committed
                pg.stop("fast")
                stopped_at = time.monotonic()
                chunks += list(in_flight)  # the stream is not affected
                traffic.wait_sent(len(traffic.results) + 10)
                time.sleep(0.5)
                start_began = time.monotonic()
                pg.start()
                started_at = time.monotonic()
                assert wait_for(lambda: any(r.status == 200 and r.started > started_at for r in traffic.results),
                                timeout=15), "no request succeeded after PostgreSQL came back"
                served_again = len(traffic.results)
                traffic.wait_sent(served_again + 6)
            assert _workers(gateway.proc.pid) == workers  # the same processes throughout
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            stuck_id = in_flight.response.headers["x-request-id"]
            log = gateway.log_text()
            assert "usage kept until the database is back" in log and "usage not recorded" not in log
            with pg.connect("qh") as db:  # the kept settlement is written once the database is back
                assert wait_for(lambda: db.execute("SELECT count(*) FROM billing_usagerecord WHERE request_id = %s",
                                                   [stuck_id]).fetchone()[0] == 1, timeout=15)
            assert wait_for(lambda: "the database is back" in gateway.log_text())
        finally:
            gateway.stop()

        results = traffic.results
        assert {r.status for r in results} <= {200, 503}, [r for r in results if r.status not in (200, 503)]
        down = [r for r in results if r.started >= stopped_at and r.started + r.seconds <= start_began]
        assert len(down) >= 10 and {(r.status, r.code) for r in down} == {(503, "database_unavailable")}
        assert max(r.seconds for r in down) < 2.0, sorted(r.seconds for r in down)[-3:]
        assert {r.status for r in results[served_again:]} == {200}

        with pg.connect("qh") as db:
            rows = dict(db.execute("SELECT request_id, status FROM billing_usagerecord WHERE member_id = %s",
                                   [world["member_id"]]).fetchall())
            answered = {r.request_id for r in results if r.status == 200} | {stuck_id}
            assert set(rows) <= {r.request_id for r in results} | {stuck_id}  # no row for a request never made
            assert {request_id for request_id, status in rows.items() if status == "ok"} <= answered
            assert set(rows.values()) <= {"ok", "rejected"}
            assert answered <= set(rows) and rows[stuck_id] == "ok"  # every answered request has its row
            # what may still be reserved: a 503 whose reservation committed as its connection died
            assert "agree" in _manage(url, redis_url, "reconcile", world["slug"])
            held = db.execute("SELECT count(*) FROM tenants_quotareservation").fetchone()[0]
            assert held <= sum(r.status == 503 for r in results)
            db.execute("UPDATE tenants_quotareservation SET created_at = now() - interval '1 day'")
            if held:
                sweep = _tagged(_manage(url, redis_url, "shell", "-c", SWEEP_SCRIPT.format(slug=world["slug"])),
                                "SWEPT")
                assert "reservations older than" in sweep["before"]
                assert sum(s["requests"] for s in sweep["swept"]) == held
                assert "the counters agree with the usage rows" in sweep["after"]
            else:
                assert "agree" in _manage(url, redis_url, "reconcile", world["slug"])
            assert db.execute("SELECT requests_reserved, tokens_reserved FROM billing_quotacounter "
                              "WHERE member_id = %s", [world["member_id"]]).fetchone() == (0, 0)


# --- 4. a worker killed mid-stream -----------------------------------------------------------------

def _workers(pid: int) -> set[int]:
    """The live uvicorn workers of the uvicorn process pid (its children but the resource tracker)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
                found.add(int(entry))
    return found


def _holder_of_connection(pids: set[int], server_port: int, client_port: int) -> int:
    """The process that holds the server side of the TCP connection server_port ↔ client_port."""
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
                inode = fields[9]
    assert inode is not None, "the stream's connection is not in /proc/net/tcp"
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the stream's connection")


def test_a_worker_killed_mid_stream(transactional_db, tmp_path):
    """SIGKILL the uvicorn worker serving a stream: the client's stream breaks, the other worker serves on.

    The client (openai SDK) saw the stream end while iterating with openai.APIConnectionError ("Connection
    error.", from httpx's RemoteProtocolError "peer closed connection without sending complete message
    body (incomplete chunked read)"). Requests sent right after were answered (200), and uvicorn (0.54)
    started a new worker in place of the dead one ("Child process [pid] died" in its log), which served
    too. The killed request has no usage row and its reservation stays until the sweep gives it back
    (backdated here); reconcile is then clean.
    """
    with start_simulator("--model", SERVED, "--itl-ms", "20") as slow:
        gateway = GatewayProcess(tmp_path, workers=2)
        try:
            world = make_world(gateway, slow.base_url)
            client = world.client()
            done = [_ok(client, stream=False)]
            workers = _workers(gateway.proc.pid)
            assert len(workers) == 2, workers
            stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=500, stream=True)
            chunks = iter(stream)
            next(chunks)  # streaming has begun: the reservation is committed
            killed_id = stream.response.headers["x-request-id"]
            client_port = stream.response.extensions["network_stream"].get_extra_info("client_addr")[1]
            victim = _holder_of_connection(workers, gateway.port, client_port)
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(openai.APIConnectionError):
                for _ in chunks:
                    pass
            for _ in range(4):  # the other worker serves on (new connections each time)
                done.append(_ok(world.client(), stream=False))
            respawned = wait_for(lambda: (now := _workers(gateway.proc.pid)) and victim not in now
                                 and len(now) == len(workers) and now, timeout=15)
            assert respawned, "uvicorn did not replace the dead worker"
            assert "died" in gateway.log_text()
            done += [_ok(world.client(), stream=bool(i % 2)) for i in range(4)]
        finally:
            gateway.stop()
    rows = _assert_one_row_each(world.member, done)  # no row for the killed request, one for each other
    assert killed_id not in {r.request_id for r in rows}
    counter = QuotaCounter.objects.get(member=world.member)
    assert counter.requests_reserved == 1 and counter.tokens_reserved > 500
    _reconcile_clean(world.team.slug)  # in flight, as far as anyone can tell yet
    QuotaReservation.objects.filter(counter=counter).update(created_at=timezone.now() - timedelta(days=1))
    [swept] = reservations_sweep()
    assert (swept["requests"], swept["tokens"]) == (1, counter.tokens_reserved)
    _assert_settled(world)
