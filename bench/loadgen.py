"""A small closed-loop HTTP load generator (asyncio + aiohttp), reusable as a library.

``run_load`` keeps ``concurrency`` requests in flight until ``total`` requests were
sent or ``duration`` seconds passed, and returns one ``Record`` per request::

    from bench.loadgen import run_load_sync, summarize
    records = run_load_sync("http://127.0.0.1:8001", "/v1/chat/completions",
                            {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                            concurrency=64, total=5000)
    print(summarize(records))

Streams are read to the end; ``ttft`` is the time to the first body bytes after the
response headers (for vLLM that is the first token, because its role chunk is sent
with it), and ``ok`` requires status 200 and, for streams, the ``data: [DONE]`` terminator.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping

import aiohttp
import orjson

__all__ = ["Record", "run_load", "run_load_sync", "percentile", "summarize"]

_DONE = b"data: [DONE]\n\n"

Body = Mapping[str, Any] | bytes | Callable[[int], Mapping[str, Any] | bytes] | None


@dataclass(slots=True)
class Record:
    """One request: start offset from the run's start, latencies in seconds."""

    index: int
    start: float
    latency: float
    ttft: float | None
    status: int
    ok: bool
    bytes: int = 0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _encode(body: Any) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    return orjson.dumps(body)


async def run_load(
    base_url: str,
    path: str,
    body: Body = None,
    *,
    headers: Mapping[str, str] | None = None,
    concurrency: int = 64,
    total: int | None = None,
    duration: float | None = None,
    stream: bool = False,
    method: str | None = None,
    timeout: float = 120.0,
    session: aiohttp.ClientSession | None = None,
    stagger: float = 0.0,
) -> list[Record]:
    """Run a closed loop of ``concurrency`` workers and return per-request records.

    ``body`` is a JSON-able mapping, pre-encoded bytes, or ``callable(index)`` returning
    either (for varied requests). ``stream`` means "read the response as SSE and
    require ``data: [DONE]``"; put ``"stream": true`` in the body yourself.
    Stops after ``total`` requests, or after ``duration`` seconds (requests already in
    flight finish), whichever comes first; one of them is required. ``stagger`` spreads
    the workers' first requests over that many seconds (worker k starts after
    k/concurrency of it) instead of sending them all at once.
    """
    if total is None and duration is None:
        raise ValueError("give total or duration")
    url = base_url.rstrip("/") + path
    method = method or ("GET" if body is None else "POST")
    static = None if callable(body) else _encode(body)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    records: list[Record] = []
    counter = 0
    t0 = time.perf_counter()
    deadline = t0 + duration if duration is not None else math.inf

    own = session is None
    if own:
        connector = aiohttp.TCPConnector(limit=0, force_close=False, ttl_dns_cache=300)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout),
            skip_auto_headers=("User-Agent",),
        )

    async def one(i: int) -> Record:
        data = _encode(body(i)) if callable(body) else static
        start = time.perf_counter()
        ttft = None
        status = 0
        nbytes = 0
        try:
            async with session.request(method, url, data=data, headers=hdrs) as resp:
                status = resp.status
                if stream:
                    tail = b""
                    async for chunk in resp.content.iter_any():
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        nbytes += len(chunk)
                        tail = (tail + chunk)[-len(_DONE):]
                    ok = status == 200 and tail == _DONE
                else:
                    payload = await resp.read()
                    nbytes = len(payload)
                    ok = 200 <= status < 300
            end = time.perf_counter()
            return Record(i, start - t0, end - start, ttft, status, ok, nbytes)
        except Exception as exc:  # noqa: BLE001 - every failure is data for the report
            end = time.perf_counter()
            return Record(i, start - t0, end - start, ttft, status, False, nbytes,
                          f"{type(exc).__name__}: {exc}")

    async def worker(k: int) -> None:
        nonlocal counter
        if stagger:
            await asyncio.sleep(stagger * k / concurrency)
        while True:
            if total is not None and counter >= total:
                return
            if time.perf_counter() >= deadline:
                return
            i = counter
            counter += 1
            records.append(await one(i))

    try:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    finally:
        if own:
            await session.close()
    records.sort(key=lambda r: r.index)
    return records


def run_load_sync(*args: Any, **kwargs: Any) -> list[Record]:
    """``run_load`` in a fresh event loop (uvloop when installed)."""
    try:
        import uvloop

        return uvloop.run(run_load(*args, **kwargs))
    except ImportError:
        return asyncio.run(run_load(*args, **kwargs))


def percentile(values: Iterable[float], p: float) -> float | None:
    """The p-th percentile (0-100) with linear interpolation; None for no data."""
    xs = sorted(values)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records: list[Record], wall: float | None = None) -> dict[str, Any]:
    """Throughput and latency percentiles (ms) of a run.

    ``wall`` defaults to first start → last end, so pass the measured wall time when
    you have it.
    """
    n = len(records)
    if not n:
        return {"requests": 0}
    if wall is None:
        wall = max(r.start + r.latency for r in records) - min(r.start for r in records)
    ok = [r for r in records if r.ok]
    lat = [r.latency * 1000 for r in ok]
    ttft = [r.ttft * 1000 for r in ok if r.ttft is not None]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = r.error or f"HTTP {r.status}"
            errors[key] = errors.get(key, 0) + 1

    def pcts(xs: list[float]) -> dict[str, float | None]:
        return {f"p{p}": percentile(xs, p) for p in (50, 90, 99)} | {"max": max(xs) if xs else None}

    return {
        "requests": n,
        "ok": len(ok),
        "errors": errors,
        "wall_s": wall,
        "rps": len(ok) / wall if wall > 0 else None,
        "latency_ms": pcts(lat),
        "ttft_ms": pcts(ttft) if ttft else None,
    }
