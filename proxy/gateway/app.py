"""The ASGI application for /v1: ``Gateway`` routes a request and drives it from key to settlement.

A POST is one ``Request`` (``request.py``) moving through stages: plan (key, body, route), admit
(rate limits, quota reservation), forward or stream (``forwarding.py``, ``relay.py``) and settle
(usage row, quota, rate limits), which runs whatever happened. ``/v1/models`` and ``/metrics``
are answered here too. The connection itself is an ``Exchange`` (``exchange.py``); every error
comes from the catalogue (``errors.py``).
"""
import asyncio
import logging

import orjson
from django.conf import settings
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.gateway import errors, forwarding, ledger
from proxy.gateway.errors import ApiError
from proxy.gateway.exchange import JSON_HEADERS, ClientGone, Exchange
from proxy.gateway.fairness import FairQueue
from proxy.gateway.keys import stop_last_used_flusher
from proxy.gateway.limits import RateLimiter
from proxy.gateway.observability import GatewayCollector, may_scrape, render
from proxy.gateway.request import ENDPOINTS, Request, key_for, log_request, plan, resolve_model
from proxy.gateway.upstream import Route, Router
from tenants.periods import period_start_for

log = logging.getLogger("qwenhub.gateway")


class Gateway:
    """The ASGI application for /v1."""

    def __init__(self) -> None:
        self.router = Router()
        self.limits = RateLimiter(settings.QWENHUB_LIMITS_REDIS_URL or None)
        self.fair_queue = FairQueue(settings.QWENHUB_LIMITS_REDIS_URL or None,
                                    queue_timeout=settings.QWENHUB_QUEUE_TIMEOUT, enabled=settings.QWENHUB_FAIR_QUEUE)
        self.collector = GatewayCollector(self)

    def queued(self, upstream_id: int) -> int:
        return self.fair_queue.stats(upstream_id).get("queued", 0)

    def degraded_total(self) -> int:
        return self.limits.degraded_total + self.fair_queue.degraded_total

    def usage_waiting(self) -> int:
        """Settlements this process keeps until the database is back (proxy.gateway.ledger.postgres)."""
        return len(getattr(ledger.backend(), "spool", ()))

    async def metrics(self, scope, receive, send) -> None:
        """GET /metrics: Prometheus text, for a scraper with the token (or on loopback)."""
        if not may_scrape(scope):
            await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"Forbidden\n"})
            return
        await self.router.refresh()
        body = render(self.collector, swept=await ledger.swept())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]})
        await send({"type": "http.response.body", "body": body})

    async def startup(self) -> None:
        self.router.start()

    async def shutdown(self) -> None:
        await self.router.stop()
        await self.limits.close()
        await self.fair_queue.close()
        await stop_last_used_flusher()  # writes the last uses still noted
        await ledger.close()

    async def __call__(self, scope, receive, send) -> None:
        ex = Exchange(scope, receive, send)
        self.router.start()
        try:
            method, path = scope["method"], scope["path"].rstrip("/") or "/"
            endpoint = ENDPOINTS.get(path)
            if endpoint and method == "POST":
                await self.proxy(ex, endpoint)
            elif path == "/v1/models" and method == "GET":
                await self.list_models(ex)
            elif path.startswith("/v1/models/") and method == "GET":
                await self.get_model(ex, path[len("/v1/models/"):])
            else:
                raise errors.not_found(method, path)
        except ClientGone:
            pass
        except ApiError as exc:
            if not ex.headers_sent:
                await ex.respond(exc.status, exc.body(), JSON_HEADERS + exc.headers)
        except Exception:
            log.exception("internal error request_id=%s", ex.request_id)
            if not ex.headers_sent:
                exc = errors.internal_error(ex.request_id)
                await ex.respond(exc.status, exc.body(), JSON_HEADERS + exc.headers)

    # --- /v1/models ---------------------------------------------------------------
    @staticmethod
    def _model_card(name: str, route: Route) -> dict:
        return {"id": name, "object": "model", "created": route.created, "owned_by": "qwenhub",
                "root": route.public_name, "parent": None, "max_model_len": route.max_model_len}

    async def list_models(self, ex: Exchange) -> None:
        key = await key_for(ex)
        await self.router.refresh()
        data = [self._model_card(r.public_name, r) for r in self.router.models if key.may_use(r.model_id)]
        await ex.respond(200, orjson.dumps({"object": "list", "data": data}))

    async def get_model(self, ex: Exchange, name: str) -> None:
        key = await key_for(ex)
        route = await resolve_model(self.router, key, name)
        await ex.respond(200, orjson.dumps(self._model_card(name, route)))

    # --- POST /v1/{chat/completions,completions,embeddings} ----------------------------
    async def proxy(self, ex: Exchange, endpoint: str) -> None:
        """Move one request through its stages: plan → admit → forward (or stream) → settle, whatever happened."""
        req = await plan(ex, endpoint, self.router)
        await self.admit(req)
        watcher = asyncio.ensure_future(ex.watch_disconnect(asyncio.current_task()))
        try:
            await self.forward(req)
        finally:
            watcher.cancel()
            await self.settle(req)

    async def admit(self, req: Request) -> None:
        """Stage 2: take the rate limits and reserve quota; a refusal is recorded (and settled) here."""
        try:
            req.admission = await self.limits.admit(req.key, req.ex.request_id, req.estimate)
            if req.admission is not None:
                req.ex.out_headers += req.admission.headers
            req.reservation = await ledger.reserve(key=req.key, tokens=req.tokens)
        except ApiError as exc:
            await self.limits.settle(req.admission, 0)
            req.row.status, req.row.http_status = errors.Status.REJECTED, exc.status
            await self._settle_rejected(req)
            raise
        req.row.period_start = req.reservation.period_start

    async def _settle_rejected(self, req: Request) -> None:
        row = req.row
        row.period_start = period_start_for(req.key.team_timezone)
        row.duration_ms = req.ex.elapsed_ms()
        try:
            await ledger.settle(row=row, usage=req.usage)
        except ApiError:
            pass
        log_request(req)

    async def forward(self, req: Request) -> None:
        """Stage 3: forward or stream; the usage row learns how it ended (errors, a client gone)."""
        row = req.row
        try:
            if req.stream:
                await forwarding.stream(req, self)
            else:
                await forwarding.forward(req, self)
        except ApiError as exc:
            row.status, row.http_status = exc.usage_status, exc.status
            raise
        except (asyncio.CancelledError, ClientGone):
            if not req.ex.gone:
                raise  # the server is shutting down: still settle
            asyncio.current_task().uncancel()
            row.status, row.http_status = errors.Status.CLIENT_DISCONNECTED, 499
            raise ClientGone() from None

    async def settle(self, req: Request) -> None:
        """Stage 4, always run: write the usage row, settle the reservation and the rate limits, log."""
        req.row.duration_ms = req.ex.elapsed_ms()
        # Settle even if this task is being cancelled: shield it and wait.
        task = asyncio.ensure_future(ledger.settle(row=req.row, usage=req.usage, reservation=req.reservation))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await task
        except ApiError:  # (the PostgreSQL ledger keeps what it cannot write: SQLite's own file failed)
            log.error("usage not recorded (database unavailable) request_id=%s", req.ex.request_id)
        await self.limits.settle(req.admission, req.usage.total_tokens)
        log_request(req)
