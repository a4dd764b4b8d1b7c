"""Stage 3 of a request: forward it to an upstream and pass the answer on, whole (``forward``) or streamed (``stream``).

``open_call`` takes a fair-queue slot of the first upstream that accepts the connection and POSTs
to it; the ``UpstreamCall`` it returns gives the slot back when the answer is over.
"""
import asyncio
import logging
import time
from typing import Protocol

import orjson
from django.conf import settings

from proxy.gateway import errors
from proxy.gateway.fairness import FairQueue, QueueTimeout
from proxy.gateway.relay import SSE_HEADERS, _StreamRelay, relay_stream
from proxy.gateway.request import Request
from proxy.gateway.upstream import Router, UpstreamState
from proxy.gateway.upstream_http import Response, UpstreamError

log = logging.getLogger("qwenhub.gateway")


class Upstreams(Protocol):
    """What forwarding needs of the gateway (app.Gateway): the routing table and the fair queue."""

    router: Router
    fair_queue: FairQueue


# What the gateway always asks of vLLM for a stream: the usage it meters from.
STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


class UpstreamCall:
    """One POST to one upstream, holding a slot of its fair queue until ``close``."""

    __slots__ = ("upstream", "slot", "response", "fair_queue")

    def __init__(self, upstream: UpstreamState, slot, response: Response, fair_queue: FairQueue) -> None:
        self.upstream, self.slot, self.response, self.fair_queue = upstream, slot, response, fair_queue

    async def close(self, reuse: bool) -> None:
        """Give back the upstream slot; keep the connection only after a complete answer."""
        self.upstream.in_flight -= 1
        if reuse:
            self.response.release()
        else:
            self.response.close()  # vLLM sees the disconnect and aborts whatever is left
        await self.fair_queue.release(self.slot)

    async def error(self, model: str) -> errors.ApiError:
        """The catalogue's error for the upstream's non-200 answer."""
        try:
            raw = await self.response.read()
        except UpstreamError:
            raw = b""
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            data = None
        return errors.from_upstream(model, self.response.status, data)


async def open_call(req: Request, gw: Upstreams) -> UpstreamCall:
    """Take a slot of the first upstream of req's route that accepts the connection and POST to it."""
    ex, route = req.ex, req.route
    last_error = None
    for upstream, served in gw.router.candidates(route):
        req.payload["model"] = served
        t = time.perf_counter()
        try:
            slot = await gw.fair_queue.acquire(upstream_id=upstream.id, capacity=upstream.max_concurrency,
                                               member_id=req.key.member_id, weight=req.key.weight)
        except QueueTimeout as exc:
            ex.upstream_wait += time.perf_counter() - t
            raise errors.upstream_busy(route.public_name, waited=exc.waited, retry_in=exc.retry_after) from None
        upstream.in_flight += 1
        try:
            response = await upstream.get_http().post(ex.scope["path"][3:], orjson.dumps(req.payload), ex.request_id)
        except BaseException as exc:
            upstream.in_flight -= 1
            ex.upstream_wait += time.perf_counter() - t
            await gw.fair_queue.release(slot)
            if isinstance(exc, asyncio.TimeoutError):
                raise errors.upstream_timeout(route.public_name, settings.QWENHUB_UPSTREAM_TIMEOUT) from None
            if not isinstance(exc, UpstreamError):
                raise
            gw.router.mark_down(upstream)  # refused, unreachable, or gone before answering
            last_error = exc
            continue
        ex.upstream_wait += time.perf_counter() - t
        req.row.upstream = upstream.name
        return UpstreamCall(upstream, slot, response, gw.fair_queue)
    log.warning("no upstream reachable for %s: %s", route.public_name, last_error.__class__.__name__)
    raise errors.upstream_unavailable(route.public_name)


async def forward(req: Request, gw: Upstreams) -> None:
    """Forward a plain request and answer with the upstream's JSON, the model renamed back to the client's."""
    call = await open_call(req, gw)
    ex, response = req.ex, call.response
    t = time.perf_counter()
    try:
        if response.status != 200:
            raise await call.error(req.route.public_name)
        try:
            data = orjson.loads(await response.read())
        except (UpstreamError, orjson.JSONDecodeError):
            data = None
        ex.upstream_wait += time.perf_counter() - t
        if not isinstance(data, dict):
            raise errors.upstream_bad_response(req.route.public_name, 200)
        if isinstance(data.get("usage"), dict):
            req.usage.take(data["usage"])
        if "model" in data:
            data["model"] = req.model_name
        req.row.ttft_ms = ex.elapsed_ms()
        await ex.respond(200, orjson.dumps(data))
    finally:
        # The answer is out before the slot goes back: the client does not wait on the fair queue.
        await call.close(reuse=True)


async def stream(req: Request, gw: Upstreams) -> None:
    """Forward a streamed request and relay its events; the usage vLLM sends is metered, then hidden if unasked."""
    req.client_options = options = req.payload.get("stream_options")
    req.payload["stream_options"] = dict(STREAM_OPTIONS)
    # What the client asked for, judged as vLLM judges it ({} means include_usage).
    wants_usage = isinstance(options, dict) and options.get("include_usage", True) is not False
    wants_running = wants_usage and bool(options.get("continuous_usage_stats"))
    call = await open_call(req, gw)
    relay = None
    try:
        if call.response.status != 200:
            raise await call.error(req.route.public_name)
        await req.ex.start(200, SSE_HEADERS)
        relay = _StreamRelay(req.usage, req.endpoint, wants_usage, wants_running, req.payload["model"],
                             req.model_name, choices=req.payload.get("n") or 1)
        await relay_stream(req, call.response, relay)
    finally:
        await call.close(reuse=relay is not None and relay.done)
