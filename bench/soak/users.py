"""The simulated users (think, then one request of the mix) and the sampler beside them."""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import aiohttp

from bench.procs import BenchDatabase
from bench.soak.config import CHAT, MODEL, QUOTAS, SAMPLE_EVERY, Config
from bench.soak.probes import process_tree_rss_mb, redis_keys


@dataclass(slots=True)
class Req:
    user: int
    kind: str  # json | stream | disconnect
    quota_member: bool
    start: float
    latency: float = 0.0
    ttft: float | None = None
    status: int = 0
    code: str | None = None  # the error body's code (429: insufficient_quota)
    request_id: str | None = None
    error: str | None = None  # a transport error, or a stream that did not end with [DONE]

    @property
    def outcome(self) -> str:
        """The class this request is counted in: ok, disconnected, quota_429 or unexpected."""
        if self.error:
            return "unexpected"
        if self.status == 200:
            return "disconnected" if self.kind == "disconnect" else "ok"
        if self.status == 429 and self.code == "insufficient_quota" and self.quota_member:
            return "quota_429"
        return "unexpected"


def _body(rng: random.Random, kind: str) -> dict:
    tokens = rng.randint(16, 96) if kind != "disconnect" else rng.randint(48, 96)
    body = {"model": MODEL, "max_tokens": tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Question {rng.randint(1, 10**6)}: explain a soak test."}]}
    if kind != "json":
        body["stream"] = True
    return body


async def _one(session, url: str, key: str, user: int, kind: str, quota: bool, rng: random.Random, t0: float) -> Req:
    r = Req(user, kind, quota, time.perf_counter() - t0)
    start = time.perf_counter()
    try:
        async with session.post(url, json=_body(rng, kind), headers={"Authorization": f"Bearer {key}"}) as resp:
            r.status, r.request_id = resp.status, resp.headers.get("x-request-id")
            if resp.status != 200:
                payload = await resp.read()
                try:
                    r.code = json.loads(payload)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    r.code = None
            elif kind == "json":
                await resp.read()
            else:
                stop_after = rng.randint(2, 6) if kind == "disconnect" else None
                chunks, tail = 0, b""
                async for chunk in resp.content.iter_any():
                    if r.ttft is None:
                        r.ttft = time.perf_counter() - start
                    chunks += 1
                    tail = (tail + chunk)[-14:]
                    if stop_after is not None and chunks >= stop_after:
                        resp.close()  # the client goes away mid-stream: the connection is closed
                        break
                if stop_after is not None and chunks < stop_after:
                    r.error = f"the stream ended after {chunks} chunks, before the client could leave"
                elif stop_after is None and tail != b"data: [DONE]\n\n":
                    r.error = "stream without data: [DONE]"
    except Exception as exc:  # noqa: BLE001 - every failure is a figure
        r.error = f"{type(exc).__name__}: {exc}"
    r.latency = time.perf_counter() - start
    return r


async def _user(session, url, key, user, quota, cfg: Config, t0, stop_at, out: list[Req]) -> None:
    rng = random.Random(cfg.seed * 100_003 + user)
    await asyncio.sleep(rng.uniform(0, min(5.0, cfg.seconds / 4)))  # users arrive over the first seconds
    n = 0
    while time.perf_counter() < stop_at:
        # the mix exactly, in every ten requests of a user, each user at its own phase (3 and 7 are prime to 10)
        slot = ((n * 7 + user * 3) % 10) / 10
        n += 1
        kind = "disconnect" if slot < cfg.disconnect_share else "stream" if slot < cfg.stream_share else "json"
        out.append(await _one(session, url, key, user, kind, quota, rng, t0))
        think = min(rng.expovariate(1 / cfg.think_s), 4 * cfg.think_s)
        await asyncio.sleep(max(0.0, min(think, stop_at - time.perf_counter())))


@dataclass
class Sample:
    t: float
    rss_mb: float
    processes: int
    pg_connections: int
    redis_keys: int
    no_ttl: list[str]


async def _sampler(gateway_pid: int, db: BenchDatabase, redis_client, t0: float, out: list[Sample]) -> None:
    def sample() -> Sample:
        rss, n = process_tree_rss_mb(gateway_pid)
        n_keys, no_ttl = redis_keys(redis_client)  # every key's TTL: a key written without one shows here
        return Sample(time.perf_counter() - t0, rss, n, db.connections(), n_keys, no_ttl)

    while True:
        out.append(await asyncio.to_thread(sample))  # off the loop the users run on
        await asyncio.sleep(SAMPLE_EVERY)


async def _drive(cfg: Config, gw_url: str, keys: list[str], gateway_pid: int, db: BenchDatabase, redis_client):
    reqs: list[Req] = []
    samples: list[Sample] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120),
                                     skip_auto_headers=("User-Agent",)) as session:
        t0 = time.perf_counter()
        sampler = asyncio.create_task(_sampler(gateway_pid, db, redis_client, t0, samples))
        await asyncio.gather(*(_user(session, gw_url + CHAT, key, i, i < len(QUOTAS), cfg, t0, t0 + cfg.seconds,
                                     reqs) for i, key in enumerate(keys)))
        wall = time.perf_counter() - t0
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    return reqs, samples, wall


