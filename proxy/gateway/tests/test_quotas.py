"""Quotas that hold under concurrency, and rate limits, through live gateway processes."""
import asyncio
import shutil
import subprocess
import time
from datetime import date, datetime, timezone as dt_timezone
from unittest import mock

import httpx
import openai
import pytest

from billing.models import UsageRecord
from proxy.gateway import ledger
from proxy.gateway.keys import authenticate, forget_all
from proxy.gateway.ledger import Usage, UsageRow
from proxy.gateway.tests.conftest import MODEL, SERVED, GatewayProcess, free_port, make_world, wait_for
from proxy.simulator.testing import start_simulator
from proxy.simulator.tokens import chat_prompt_tokens
from tenants.models import QuotaCounter

MESSAGES = [{"role": "user", "content": "Count to three."}]
PROMPT = chat_prompt_tokens(MESSAGES)


@pytest.fixture(scope="module")
def second_gateway(django_db_setup, tmp_path_factory):
    process = GatewayProcess(tmp_path_factory.mktemp("gateway2"))
    yield process
    process.stop()


def _fire(urls: list[str], key: str, count: int, **body) -> list[httpx.Response]:
    """Send count chat requests at once, alternating between gateway URLs."""
    async def run():
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return await asyncio.gather(*(
                client.post(urls[i % len(urls)] + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **body})
                for i in range(count)
            ))
    return asyncio.run(run())


def test_request_quota_is_exact_across_two_gateways(transactional_db, gateway, second_gateway, sim):
    world = make_world(gateway, sim.base_url, request_quota=50)
    responses = _fire([gateway.url, second_gateway.url], world.key, 200)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(refused)) == (50, 150)
    for r in refused:
        error = r.json()["error"]
        assert error["code"] == "insufficient_quota" and "50 requests" in error["message"]
        assert r.headers["x-should-retry"] == "false"
    wait_for(lambda: UsageRecord.objects.filter(member=world.member).count() == 200)
    counter = QuotaCounter.objects.get(member=world.member)
    assert (counter.requests_used, counter.requests_reserved, counter.tokens_reserved) == (50, 0, 0)
    assert UsageRecord.objects.filter(member=world.member, status="rejected", http_status=429).count() == 150
    # the SDK does not retry an exhausted quota
    with pytest.raises(openai.RateLimitError) as exc:
        world.client(max_retries=2).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert exc.value.code == "insufficient_quota"
    assert QuotaCounter.objects.get(member=world.member).requests_used == 50


def test_token_quota_never_overspent_by_concurrent_streams(transactional_db, gateway, second_gateway, sim):
    per_request = PROMPT + 200
    # room for about nine requests' real usage: forty streams at once must not all get through
    world = make_world(gateway, sim.base_url, token_quota=2000)
    responses = _fire([gateway.url, second_gateway.url], world.key, 40, stream=True, max_tokens=200, ignore_eos=True)
    ok = [r for r in responses if r.status_code == 200]
    assert 0 < len(ok) <= 2000 // per_request
    assert all(r.json()["error"]["code"] == "insufficient_quota" for r in responses if r.status_code != 200)
    wait_for(lambda: UsageRecord.objects.filter(member=world.member).count() == 40)
    counter = QuotaCounter.objects.get(member=world.member)
    assert counter.tokens_used == len(ok) * per_request <= 2000
    assert (counter.tokens_reserved, counter.requests_reserved) == (0, 0)


@pytest.mark.parametrize("fault", ["hang", "cut", "error_chunk", "500"])
def test_reservation_released_after_upstream_failures(transactional_db, gateway, fault):
    with start_simulator("--model", SERVED, "--fault", fault) as broken:
        world = make_world(gateway, broken.base_url, token_quota=100_000, request_quota=100)
        _fire([gateway.url], world.key, 6, stream=fault in ("cut", "error_chunk"))
    wait_for(lambda: UsageRecord.objects.filter(member=world.member).count() == 6, timeout=10)
    counter = QuotaCounter.objects.get(member=world.member)
    assert (counter.requests_reserved, counter.tokens_reserved) == (0, 0)
    assert counter.tokens_used == sum(UsageRecord.objects.filter(member=world.member).values_list("total_tokens", flat=True))


def test_reservation_released_after_client_disconnects(transactional_db, gateway):
    with start_simulator("--model", SERVED, "--itl-ms", "30", "--response-tokens", "500") as slow:
        world = make_world(gateway, slow.base_url, token_quota=100_000)

        async def run():
            async with httpx.AsyncClient(timeout=10) as client:
                async def one(stream):
                    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "stream": stream}
                    try:
                        async with client.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                                                 headers={"Authorization": f"Bearer {world.key}"},
                                                 timeout=0.4) as response:
                            received = 0
                            async for _ in response.aiter_bytes():
                                received += 1
                                if received == 3:
                                    break  # the client walks away mid-stream
                    except httpx.TimeoutException:
                        pass  # the client gives up: mid-stream, or before a non-streamed answer
                await asyncio.gather(*(one(i % 2 == 0) for i in range(6)))

        asyncio.run(run())
        wait_for(lambda: UsageRecord.objects.filter(member=world.member).count() == 6, timeout=10)
        assert wait_for(lambda: slow.stats()["running"] == 0)
    rows = UsageRecord.objects.filter(member=world.member)
    assert {r.status for r in rows} == {"client_disconnected"}, [(r.status, r.http_status) for r in rows]
    counter = QuotaCounter.objects.get(member=world.member)
    assert (counter.requests_reserved, counter.tokens_reserved) == (0, 0)
    assert counter.tokens_used == sum(r.total_tokens for r in rows)
    assert all(r.total_tokens < PROMPT + 400 for r in rows)


def test_month_boundary_in_the_team_time_zone(transactional_db):
    """23:59:59 and 00:00:01 in Shanghai on the last night of November land in two periods."""
    from tenants.services import api_key_issue, member_add, team_create

    team = team_create(slug="tz", name="TZ", timezone_name="Asia/Shanghai")
    member = member_add(team=team, username="night-owl", request_quota=10)
    _, raw = api_key_issue(member=member)
    forget_all()

    async def one(instant: datetime) -> date:
        with mock.patch("django.utils.timezone.now", return_value=instant):
            key = await authenticate(raw)
            reservation = await ledger.reserve(key=key, tokens=10)
            row = UsageRow(request_id=f"r-{instant.timestamp()}", team_id=key.team_id, member_id=key.member_id,
                           api_key_id=key.key_id, period_start=reservation.period_start, endpoint="chat",
                           model=MODEL, started_at=instant)
            await ledger.settle(row=row, usage=Usage(prompt_tokens=3, completion_tokens=2), reservation=reservation)
            return reservation.period_start

    async def both() -> tuple[date, date]:
        try:
            return (await one(datetime(2026, 11, 30, 15, 59, 59, tzinfo=dt_timezone.utc)),
                    await one(datetime(2026, 11, 30, 16, 0, 1, tzinfo=dt_timezone.utc)))
        finally:
            await ledger.close()  # the pool belongs to this event loop

    before, after = asyncio.run(both())
    assert (before, after) == (date(2026, 11, 1), date(2026, 12, 1))
    counters = {c.period_start: c for c in QuotaCounter.objects.filter(member=member)}
    assert set(counters) == {date(2026, 11, 1), date(2026, 12, 1)}
    assert all((c.requests_used, c.tokens_used, c.tokens_reserved) == (1, 5, 0) for c in counters.values())
    assert sorted(UsageRecord.objects.filter(member=member).values_list("period_start", flat=True)) == [
        date(2026, 11, 1), date(2026, 12, 1)]


# --- rate limits -----------------------------------------------------------------------------

def _post(world, **body):
    return httpx.post(world.gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {world.key}"},
                      json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **body}, timeout=20)


def test_requests_per_minute(transactional_db, gateway, sim):
    world = make_world(gateway, sim.base_url)
    world.member.requests_per_minute = 3
    world.member.save(update_fields=["requests_per_minute"])
    first = _post(world)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "3"
    assert first.headers["x-ratelimit-remaining-requests"] == "2"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert [_post(world).status_code for _ in range(2)] == [200, 200]
    limited = _post(world)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    wait_ms = int(limited.headers["retry-after-ms"])
    assert 10_000 < wait_ms <= 20_000  # one request refills every 20 s; a few ms have passed
    assert limited.headers["retry-after"] == str(-(-wait_ms // 1000))
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in limited.headers  # the SDK may retry a rate limit


def test_tokens_per_minute_charges_real_usage(transactional_db, gateway, sim):
    world = make_world(gateway, sim.base_url)
    world.member.tokens_per_minute = 1000
    world.member.save(update_fields=["tokens_per_minute"])
    first = _post(world, max_tokens=300)
    assert first.status_code == 200 and first.headers["x-ratelimit-limit-tokens"] == "1000"
    # admission took the estimate (max_tokens counts); settlement gave back what was not used
    second = _post(world, max_tokens=300)
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert 1000 - 2 * 300 - 40 <= remaining <= 1000 - 300
    too_big = _post(world, max_tokens=5000)
    assert too_big.status_code == 429 and too_big.headers["x-should-retry"] == "false"


def test_concurrency_limit_and_slots_freed_after_failures(transactional_db, gateway):
    with start_simulator("--model", SERVED, "--itl-ms", "20") as slow:
        world = make_world(gateway, slow.base_url)
        world.member.max_concurrent_requests = 2
        world.member.save(update_fields=["max_concurrent_requests"])
        responses = _fire([gateway.url], world.key, 6, max_tokens=20)
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and 429 in codes
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.json()["error"]["code"] == "rate_limit_exceeded" and int(busy.headers["retry-after-ms"]) > 0
        slow.control(fault="500")
        assert [_post(world).status_code for _ in range(4)] == [502] * 4
        slow.control(fault=None)
    # after upstream errors and the simulator going away, both slots are free again
    with start_simulator("--model", SERVED) as fresh:
        from proxy.models import Upstream

        Upstream.objects.filter(pk=world.upstream.pk).update(base_url=fresh.base_url)
        assert sorted(r.status_code for r in _fire([gateway.url], world.key, 2)) == [200, 200]


def test_redis_outage_fails_no_request_and_quota_stays_exact(transactional_db, sim, tmp_path):
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.fail("redis-server is needed for this test")
    port = free_port()
    redis = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0)
        gw = GatewayProcess(tmp_path, REDIS_URL=f"redis://127.0.0.1:{port}/0")
        try:
            world = make_world(gw, sim.base_url, request_quota=30)
            world.member.requests_per_minute = 1000
            world.member.max_concurrent_requests = 50
            world.member.save(update_fields=["requests_per_minute", "max_concurrent_requests"])
            first = _fire([gw.url], world.key, 10)
            assert {r.status_code for r in first} == {200}, [r.text for r in first if r.status_code != 200]
            redis.kill()
            redis.wait()
            time.sleep(0.2)
            responses = _fire([gw.url], world.key, 30)
            assert sorted({r.status_code for r in responses}) == [200, 429]
            assert sum(r.status_code == 200 for r in responses) == 20  # 30 - the 10 before the outage
            assert "Redis unavailable" in gw.log_text()
        finally:
            gw.stop()
    finally:
        if redis.poll() is None:
            redis.kill()
    wait_for(lambda: UsageRecord.objects.filter(member=world.member).count() == 40)
    counter = QuotaCounter.objects.get(member=world.member)
    assert (counter.requests_used, counter.requests_reserved) == (30, 0)


# --- fair sharing of a saturated upstream ------------------------------------------------------

def test_fair_share_keeps_a_light_member_fast_while_another_floods(transactional_db, gateway):
    """Capacity 8, member A keeps 100 requests in flight, member B sends 20 one at a time."""
    import statistics

    # GPU-like pacing; real requests differ in length, so slots free up at different times
    pace = ["--ttft-ms", "50", "--itl-ms", "10", "--max-num-seqs", "8", "--jitter", "0.2", "--seed", "7"]
    with start_simulator("--model", SERVED, *pace) as gpu:
        world = make_world(gateway, gpu.base_url)
        from proxy.models import Upstream

        Upstream.objects.filter(pk=world.upstream.pk).update(max_concurrency=8)
        flooder, flood_key = world.add_member("flooder")
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "ignore_eos": True}

        async def b_latencies(client: httpx.AsyncClient, count: int) -> list[float]:
            latencies = []
            for _ in range(count):
                t = time.perf_counter()
                response = await client.post(gateway.url + "/v1/chat/completions", json=body,
                                             headers={"Authorization": f"Bearer {world.key}"})
                assert response.status_code == 200, response.text
                latencies.append(time.perf_counter() - t)
            return latencies

        async def run():
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
                idle = await b_latencies(client, 5)
                stop = asyncio.Event()
                running_samples = []

                async def flood_worker(n: int):
                    while not stop.is_set():
                        n += 7
                        r = await client.post(gateway.url + "/v1/chat/completions",
                                              json={**body, "max_tokens": 12 + n % 25},
                                              headers={"Authorization": f"Bearer {flood_key}"})
                        assert r.status_code == 200, r.text

                async def sample():
                    while not stop.is_set():
                        running_samples.append(gpu.metrics().get("vllm:num_requests_running", 0))
                        await asyncio.sleep(0.1)

                workers = [asyncio.create_task(flood_worker(i)) for i in range(100)]
                await asyncio.sleep(1.0)  # let the flood fill the GPU and the queue
                sampler = asyncio.create_task(sample())
                flooded = await b_latencies(client, 20)
                stop.set()
                await asyncio.gather(*workers, sampler)
                return idle, flooded, running_samples

        idle, flooded, running = asyncio.run(run())
    ratio = statistics.median(flooded) / statistics.median(idle)
    assert ratio <= 1.5, (ratio, idle, flooded)
    assert statistics.mean(running) >= 7.0, running  # the GPU stayed (nearly) full
    assert max(running) <= 8


def test_team_token_cap_holds_across_members(transactional_db, gateway, second_gateway, sim):
    from tenants.models import TeamQuotaCounter

    world = make_world(gateway, sim.base_url)
    world.team.token_cap = 1500
    world.team.save(update_fields=["token_cap"])
    _, other_key = world.add_member()
    body = {"max_tokens": 200, "ignore_eos": True}
    responses = _fire([gateway.url, second_gateway.url], world.key, 10, **body)
    responses += _fire([second_gateway.url, gateway.url], other_key, 10, **body)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert ok and refused and len(ok) + len(refused) == 20
    assert all("team's monthly cap of 1500 tokens" in r.json()["error"]["message"] for r in refused)
    wait_for(lambda: UsageRecord.objects.filter(team=world.team).count() == 20)
    team_counter = TeamQuotaCounter.objects.get(team=world.team)
    assert team_counter.tokens_used == len(ok) * (PROMPT + 200) <= 1500
    assert team_counter.tokens_reserved == 0
    assert sum(c.tokens_used for c in QuotaCounter.objects.filter(member__team=world.team)) == team_counter.tokens_used
    # a member's reservation is rolled back when the team has no room
    assert all(c.tokens_reserved == 0 and c.requests_reserved == 0
               for c in QuotaCounter.objects.filter(member__team=world.team))
