"""The ASGI application for /v1: ``Gateway`` routes a request and drives it from key to settlement.

It authenticates, validates the body, picks an upstream and waits for a fair-queue slot,
reserves quota, forwards (plainly or as a stream, see ``relay.py``) and settles usage and rate
limits whatever happened; ``/v1/models`` and ``/metrics`` are answered here too. The request
itself is an ``Exchange`` (``exchange.py``).
"""
import asyncio
import logging
import time

import orjson
from django.conf import settings
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST

from billing.models import UsageRecord
from proxy.gateway import errors, ledger
from proxy.gateway.errors import ApiError, invalid_request
from proxy.gateway.exchange import JSON_HEADERS, ClientGone, Exchange
from proxy.gateway.fairness import FairQueue, QueueTimeout
from proxy.gateway.keys import KeyInfo, authenticate, extract_key
from proxy.gateway.ledger import Usage, UsageRow
from proxy.gateway.limits import RateLimiter
from proxy.gateway.observability import AUTH_FAILURES, GatewayCollector, may_scrape, observe, render
from proxy.gateway.relay import DONE, SSE_HEADERS, _StreamRelay, _error_event
from proxy.gateway.upstream import Route, Router, UpstreamState
from proxy.gateway.upstream_http import Response, UpstreamError
from tenants import quota
from tenants.periods import period_start_for

log = logging.getLogger("qwenhub.gateway")

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
REQUIRED_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input"}


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

    async def metrics(self, scope, receive, send) -> None:
        """GET /metrics: Prometheus text, for a scraper with the token (or on loopback)."""
        if not may_scrape(scope):
            await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"Forbidden\n"})
            return
        await self.router.refresh()
        body = render(self.collector)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]})
        await send({"type": "http.response.body", "body": body})

    async def startup(self) -> None:
        self.router.start()

    async def shutdown(self) -> None:
        await self.router.stop()
        await self.limits.close()
        await self.fair_queue.close()
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
                raise invalid_request(errors.NOT_FOUND.format(method=method, path=path), code="not_found", status=404)
        except ClientGone:
            pass
        except ApiError as exc:
            if not ex.headers_sent:
                await ex.respond(exc.status, exc.body(), JSON_HEADERS + exc.headers)
        except Exception:
            log.exception("internal error request_id=%s", ex.request_id)
            if not ex.headers_sent:
                body = errors.error_body(errors.INTERNAL_ERROR.format(request_id=ex.request_id), "server_error")
                await ex.respond(500, body)

    # --- /v1/models ---------------------------------------------------------------
    async def _authenticate(self, ex: Exchange) -> KeyInfo:
        key = await authenticate(extract_key(dict(ex.scope["headers"])))
        if key is None:
            AUTH_FAILURES.inc()
            raise ApiError(401, errors.INVALID_KEY, "invalid_request_error", code="invalid_api_key")
        return key

    @staticmethod
    def _model_card(name: str, route: Route) -> dict:
        return {"id": name, "object": "model", "created": route.created, "owned_by": "qwenhub",
                "root": route.public_name, "parent": None, "max_model_len": route.max_model_len}

    async def list_models(self, ex: Exchange) -> None:
        key = await self._authenticate(ex)
        await self.router.refresh()
        data = [self._model_card(r.public_name, r) for r in self.router.models if key.may_use(r.model_id)]
        await ex.respond(200, orjson.dumps({"object": "list", "data": data}))

    async def get_model(self, ex: Exchange, name: str) -> None:
        key = await self._authenticate(ex)
        route = await self.router.resolve(name)
        if route is None or not key.may_use(route.model_id):
            raise invalid_request(errors.MODEL_NOT_FOUND.format(model=name), param="model",
                                  code="model_not_found", status=404)
        await ex.respond(200, orjson.dumps(self._model_card(name, route)))

    # --- POST /v1/{chat/completions,completions,embeddings} ----------------------------
    @staticmethod
    def _parse(body: bytes, endpoint: str) -> dict:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise invalid_request(errors.INVALID_JSON, code="invalid_json") from None
        if not isinstance(payload, dict):
            raise invalid_request(errors.INVALID_JSON, code="invalid_json")
        for name in ("model", REQUIRED_FIELD[endpoint]):
            if payload.get(name) in (None, "", []):
                raise invalid_request(errors.MISSING_FIELD.format(field=name), param=name, code="missing_required_parameter")
        if not isinstance(payload["model"], str):
            raise invalid_request(errors.WRONG_TYPE.format(field="model", kind="a string"), param="model")
        if endpoint == "chat" and not isinstance(payload["messages"], list):
            raise invalid_request(errors.WRONG_TYPE.format(field="messages", kind="an array"), param="messages")
        for name in ("n", "max_tokens", "max_completion_tokens"):
            value = payload.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise invalid_request(errors.WRONG_TYPE.format(field=name, kind="a positive integer"), param=name)
        if "stream" in payload and not isinstance(payload["stream"], bool) and payload["stream"] is not None:
            raise invalid_request(errors.WRONG_TYPE.format(field="stream", kind="a boolean"), param="stream")
        if endpoint == "embeddings" and payload.get("stream"):
            raise invalid_request("Embeddings cannot be streamed.", param="stream")
        return payload

    @staticmethod
    def _completion_bound(payload: dict, endpoint: str, route: Route) -> int:
        """The most completion tokens this request can produce; sets max_tokens upstream when the client left it out."""
        if endpoint == "embeddings":
            return 0
        if endpoint == "chat":
            max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        else:
            max_tokens = payload.get("max_tokens") or 16  # vLLM's default for completions
        if max_tokens is None:
            max_tokens = route.default_max_tokens
            payload["max_tokens"] = max_tokens
        return max_tokens * (payload.get("n") or 1)

    async def proxy(self, ex: Exchange, endpoint: str) -> None:
        key = await self._authenticate(ex)
        body = await ex.read_body(settings.QWENHUB_MAX_BODY_BYTES)
        payload = self._parse(body, endpoint)
        model_name = payload["model"]
        route = await self.router.resolve(model_name)
        if route is None or not key.may_use(route.model_id):
            raise invalid_request(errors.MODEL_NOT_FOUND.format(model=model_name), param="model",
                                  code="model_not_found", status=404)
        stream = payload.get("stream") is True
        completion_bound = self._completion_bound(payload, endpoint, route)
        # The quota reserves the worst case; rate limits take an estimate, corrected at settlement.
        tokens = quota.reservation_tokens(body_bytes=len(body), completion_bound=completion_bound,
                                          max_model_len=route.max_model_len)
        estimate = len(body) // 4 + completion_bound
        row = UsageRow(
            request_id=ex.request_id, team_id=key.team_id, member_id=key.member_id, api_key_id=key.key_id,
            period_start=None, endpoint=endpoint, model=route.public_name, started_at=timezone.now(), stream=stream,
        )
        usage = Usage()
        admission = None
        try:
            admission = await self.limits.admit(key, ex.request_id, estimate)
            if admission is not None:
                ex.out_headers += admission.headers
            reservation = await ledger.reserve(key=key, tokens=tokens)
        except ApiError as exc:
            await self.limits.settle(admission, 0)
            row.status, row.http_status = UsageRecord.Status.REJECTED, exc.status
            await self._settle_rejected(ex, key, row, usage)
            raise
        row.period_start = reservation.period_start
        watcher = asyncio.ensure_future(ex.watch_disconnect(asyncio.current_task()))
        try:
            if stream:
                client_options = payload.get("stream_options")
                payload["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
                await self.forward_stream(ex, key, route, payload, model_name, client_options, endpoint, row, usage)
            else:
                await self.forward(ex, key, route, payload, model_name, row, usage)
        except ApiError as exc:
            row.status, row.http_status = exc.usage_status, exc.status
            raise
        except (asyncio.CancelledError, ClientGone):
            if not ex.gone:
                raise  # the server is shutting down: still settle (below)
            asyncio.current_task().uncancel()
            row.status, row.http_status = UsageRecord.Status.CLIENT_DISCONNECTED, 499
            raise ClientGone() from None
        finally:
            watcher.cancel()
            row.duration_ms = ex.elapsed_ms()
            # Settle even if this task is being cancelled: shield it and wait.
            task = asyncio.ensure_future(ledger.settle(row=row, usage=usage, reservation=reservation))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                await task
            except ApiError:
                log.error("usage not recorded (database unavailable) request_id=%s", ex.request_id)
            await self.limits.settle(admission, usage.total_tokens)
            self._log(ex, key, row, usage)

    async def _settle_rejected(self, ex: Exchange, key: KeyInfo, row: UsageRow, usage: Usage) -> None:
        row.period_start = period_start_for(key.team_timezone)
        row.duration_ms = ex.elapsed_ms()
        try:
            await ledger.settle(row=row, usage=usage)
        except ApiError:
            pass
        self._log(ex, key, row, usage)

    @staticmethod
    def _log(ex: Exchange, key: KeyInfo, row: UsageRow, usage: Usage) -> None:
        """One structured line and the metrics for every authenticated request (never the prompt or the key)."""
        overhead = ex.overhead_ms()
        observe(model=row.model, member=key.username, status=row.status, prompt=usage.prompt_tokens,
                completion=usage.completion_tokens, duration_s=row.duration_ms / 1000,
                ttft_s=row.ttft_ms / 1000 if row.ttft_ms is not None else None, overhead_s=overhead / 1000)
        log.info(
            "request_id=%s member=%s model=%s upstream=%s status=%s http=%s stream=%s prompt=%s completion=%s "
            "ttft_ms=%s duration_ms=%.1f overhead_ms=%.2f",
            ex.request_id, key.username, row.model, row.upstream or "-", row.status, row.http_status,
            row.stream, usage.prompt_tokens, usage.completion_tokens,
            f"{row.ttft_ms:.1f}" if row.ttft_ms is not None else "-", row.duration_ms, overhead,
        )

    # --- forwarding ---------------------------------------------------------------------
    async def _open(self, ex: Exchange, route: Route, payload: dict, row: UsageRow, key: KeyInfo):
        """Take a slot of the first upstream that accepts the connection and POST to it.

        Returns (upstream, slot, response); the caller releases the slot when the answer is over.
        """
        last_error = None
        for upstream, served in self.router.candidates(route):
            payload["model"] = served
            t = time.perf_counter()
            try:
                slot = await self.fair_queue.acquire(upstream_id=upstream.id, capacity=upstream.max_concurrency,
                                                     member_id=key.member_id, weight=key.weight)
            except QueueTimeout as exc:
                ex.upstream_wait += time.perf_counter() - t
                wait_ms = max(100, round(exc.retry_after * 1000))
                raise ApiError(429, errors.UPSTREAM_BUSY.format(model=route.public_name, seconds=exc.waited),
                               "requests", code="rate_limit_exceeded",
                               headers=[(b"retry-after-ms", str(wait_ms).encode()),
                                        (b"retry-after", str(-(-wait_ms // 1000)).encode())]) from None
            upstream.in_flight += 1
            try:
                response = await upstream.get_http().post(ex.scope["path"][3:], orjson.dumps(payload), ex.request_id)
            except BaseException as exc:
                upstream.in_flight -= 1
                ex.upstream_wait += time.perf_counter() - t
                await self.fair_queue.release(slot)
                if isinstance(exc, asyncio.TimeoutError):
                    raise ApiError(504, errors.UPSTREAM_TIMEOUT.format(
                        model=route.public_name, seconds=settings.QWENHUB_UPSTREAM_TIMEOUT),
                        "timeout", code="upstream_timeout", usage_status=UsageRecord.Status.UPSTREAM_TIMEOUT) from None
                if not isinstance(exc, UpstreamError):
                    raise
                self.router.mark_down(upstream)  # refused, unreachable, or gone before answering
                last_error = exc
                continue
            ex.upstream_wait += time.perf_counter() - t
            row.upstream = upstream.name
            return upstream, slot, response
        log.warning("no upstream reachable for %s: %s", route.public_name, last_error.__class__.__name__)
        raise ApiError(503, errors.UPSTREAM_UNAVAILABLE.format(model=route.public_name), "service_unavailable",
                       code="upstream_unavailable", usage_status=UsageRecord.Status.UPSTREAM_UNAVAILABLE)

    async def _close(self, upstream: UpstreamState, slot, response: Response, reuse: bool) -> None:
        """Give back the upstream slot; keep the connection only after a complete answer."""
        upstream.in_flight -= 1
        if reuse:
            response.release()
        else:
            response.close()  # vLLM sees the disconnect and aborts whatever is left
        await self.fair_queue.release(slot)

    async def _upstream_error(self, route: Route, response: Response) -> ApiError:
        """Turn an upstream error response into an OpenAI-shaped ApiError."""
        status = response.status
        try:
            raw = await response.read()
        except UpstreamError:
            raw = b""
        message = errors.UPSTREAM_BAD_RESPONSE.format(model=route.public_name, status=status)
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            data = None
        if 400 <= status < 500 and status not in (401, 403):
            err = data.get("error", data) if isinstance(data, dict) else None
            if isinstance(err, dict) and isinstance(err.get("message"), str):
                return ApiError(status, err["message"], str(err.get("type") or "invalid_request_error"),
                                param=err.get("param"), code=err.get("code"),
                                usage_status=UsageRecord.Status.UPSTREAM_ERROR)
            return ApiError(status, message, "invalid_request_error", usage_status=UsageRecord.Status.UPSTREAM_ERROR)
        if status == 503:
            return ApiError(503, errors.UPSTREAM_UNAVAILABLE.format(model=route.public_name), "service_unavailable",
                            code="upstream_unavailable", usage_status=UsageRecord.Status.UPSTREAM_UNAVAILABLE)
        # 401/403 (the gateway's upstream key is wrong) and 5xx are the server's problem, not the client's.
        return ApiError(502, message, "upstream_error", code="bad_gateway", usage_status=UsageRecord.Status.UPSTREAM_ERROR)

    async def forward(self, ex: Exchange, key: KeyInfo, route: Route, payload: dict, model_name: str,
                      row: UsageRow, usage: Usage) -> None:
        upstream, slot, response = await self._open(ex, route, payload, row, key)
        t = time.perf_counter()
        try:
            if response.status != 200:
                raise await self._upstream_error(route, response)
            try:
                data = orjson.loads(await response.read())
            except (UpstreamError, orjson.JSONDecodeError):
                data = None
            ex.upstream_wait += time.perf_counter() - t
            if not isinstance(data, dict):
                raise ApiError(502, errors.UPSTREAM_BAD_RESPONSE.format(model=route.public_name, status=200),
                               "upstream_error", code="bad_gateway", usage_status=UsageRecord.Status.UPSTREAM_ERROR)
            if isinstance(data.get("usage"), dict):
                usage.take(data["usage"])
            if "model" in data:
                data["model"] = model_name
            row.ttft_ms = ex.elapsed_ms()
            await ex.respond(200, orjson.dumps(data))
        finally:
            # The answer is out before the slot goes back: the client does not wait on the fair queue.
            await self._close(upstream, slot, response, reuse=True)

    async def forward_stream(self, ex: Exchange, key: KeyInfo, route: Route, payload: dict, model_name: str,
                             client_options, endpoint: str, row: UsageRow, usage: Usage) -> None:
        # What the client asked for, judged as vLLM judges it ({} means include_usage).
        wants_usage = isinstance(client_options, dict) and client_options.get("include_usage", True) is not False
        wants_running = wants_usage and bool(client_options.get("continuous_usage_stats"))
        upstream, slot, response = await self._open(ex, route, payload, row, key)
        relay = None
        try:
            if response.status != 200:
                raise await self._upstream_error(route, response)
            await ex.start(200, SSE_HEADERS)
            relay = _StreamRelay(usage, endpoint, wants_usage, wants_running, payload["model"], model_name,
                                 choices=payload.get("n") or 1)
            try:
                async for data in response.iter_any():
                    if row.ttft_ms is None:
                        row.ttft_ms = ex.elapsed_ms()
                    out = relay.feed(data)
                    if out:
                        await ex.body(out, True)
                    if relay.finished:
                        break
            except UpstreamError:
                pass  # the upstream broke off: answered below
            if relay.failed or not relay.done:
                row.status, row.http_status = UsageRecord.Status.UPSTREAM_ERROR, 502
                await ex.body((b"" if relay.failed else _error_event(route)) + DONE, False)
                return
            await ex.body(b"", False)
        finally:
            await self._close(upstream, slot, response, reuse=relay is not None and relay.done)
