"""One POST /v1/{chat/completions,completions,embeddings} as one object moving through the gateway's stages.

``plan`` makes the ``Request``: it authenticates, reads and checks the body, resolves the model
and works out what to reserve. ``Gateway.proxy`` (``app.py``) then moves it through admit (rate
limits, quota reservation), forward or stream (``forwarding.py``) and settle, which runs whatever
happened. ``log_request`` writes its one log line and its metrics.
"""
import logging

import orjson
from django.conf import settings
from django.utils import timezone

from proxy.gateway import errors
from proxy.gateway.exchange import Exchange
from proxy.gateway.keys import KeyInfo, authenticate, bad_key_wait_ms, extract_key, known_key, note_bad_key
from proxy.gateway.ledger import Usage, UsageRow
from proxy.gateway.observability import AUTH_FAILURES, observe
from proxy.gateway.upstream import Route, Router
from tenants import quota

log = logging.getLogger("qwenhub.gateway")

ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}
REQUIRED_FIELD = {"chat": "messages", "completions": "prompt", "embeddings": "input"}


class Request:
    """What the gateway knows about one request, from its key to its settlement."""

    __slots__ = ("ex", "key", "endpoint", "payload", "route", "model_name", "stream", "client_options",
                 "tokens", "estimate", "admission", "reservation", "row", "usage")

    def __init__(self, ex: Exchange, key: KeyInfo, endpoint: str) -> None:
        self.ex, self.key, self.endpoint = ex, key, endpoint
        self.payload: dict = {}  # the body, as it will be sent upstream
        self.route: Route | None = None
        self.model_name = ""  # the model as the client named it (an alias, perhaps)
        self.stream = False
        self.client_options = None  # the client's stream_options, before the gateway's own replace them
        self.tokens = 0  # the quota's reservation: the worst case
        self.estimate = 0  # what the rate limits take until settlement corrects it
        self.admission = None  # the rate limits' Admission (None: the member has no limits)
        self.reservation = None  # the ledger's Reservation
        self.row: UsageRow | None = None
        self.usage = Usage()


async def key_for(ex: Exchange) -> KeyInfo:
    """The key of the request, or the 401 every bad key gets alike (a 429 once an address guesses too often)."""
    raw = extract_key(dict(ex.scope["headers"]))
    address = (ex.scope.get("client") or ("?",))[0]
    if (wait_ms := bad_key_wait_ms(address)) is not None and not known_key(raw):
        AUTH_FAILURES.inc()
        raise errors.too_many_bad_keys(wait_ms)
    key = await authenticate(raw)
    if key is None:
        AUTH_FAILURES.inc()
        note_bad_key(address)
        raise errors.invalid_key()
    return key


async def resolve_model(router: Router, key: KeyInfo, name: str) -> Route:
    """The route of model `name`, or a 404 when there is none or key may not use it."""
    route = await router.resolve(name)
    if route is None or not key.may_use(route.model_id):
        raise errors.model_not_found(name)
    return route


# OpenAI's bound on `n`: a request for a million choices would tie up the model server.
MAX_CHOICES = 128


def parse(body: bytes, endpoint: str) -> dict:
    """The JSON body, checked as far as the gateway needs (vLLM judges the rest)."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise errors.invalid_json() from None
    if not isinstance(payload, dict):
        raise errors.invalid_json()
    for name in ("model", REQUIRED_FIELD[endpoint]):
        if payload.get(name) in (None, "", []):
            raise errors.missing_field(name)
    if not isinstance(payload["model"], str):
        raise errors.wrong_type("model", "a string")
    if endpoint == "chat" and not isinstance(payload["messages"], list):
        raise errors.wrong_type("messages", "an array")
    for name in ("n", "max_tokens", "max_completion_tokens"):
        value = payload.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise errors.wrong_type(name, "a positive integer")
    if (payload.get("n") or 1) > MAX_CHOICES:
        raise errors.too_many_choices(MAX_CHOICES)
    if "stream" in payload and not isinstance(payload["stream"], bool) and payload["stream"] is not None:
        raise errors.wrong_type("stream", "a boolean")
    if endpoint == "embeddings" and payload.get("stream"):
        raise errors.embeddings_not_streamed()
    return payload


def completion_bound(payload: dict, endpoint: str, route: Route) -> int:
    """The most completion tokens this request can produce; sets max_tokens upstream when the client left it out."""
    if endpoint == "embeddings":
        return 0
    if endpoint == "chat":
        max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
    else:
        max_tokens = payload.get("max_tokens") or 16  # vLLM's default for completions
    if max_tokens is not None and max_tokens >= route.max_model_len:
        # vLLM refuses it whatever the prompt; answered here so no quota is reserved for it.
        raise errors.max_tokens_too_large(max_tokens, route.max_model_len)
    if max_tokens is None:
        max_tokens = route.default_max_tokens
        payload["max_tokens"] = max_tokens
    return max_tokens * (payload.get("n") or 1)


async def plan(ex: Exchange, endpoint: str, router: Router) -> Request:
    """Stage 1: the Request, authenticated and checked, with its route, reservation size and usage row."""
    req = Request(ex, await key_for(ex), endpoint)
    body = await ex.read_body(settings.QWENHUB_MAX_BODY_BYTES, settings.QWENHUB_BODY_TIMEOUT)
    req.payload = payload = parse(body, endpoint)
    req.model_name = payload["model"]
    req.route = route = await resolve_model(router, req.key, req.model_name)
    req.stream = payload.get("stream") is True
    bound = completion_bound(payload, endpoint, route)
    # The quota reserves the worst case; rate limits take an estimate, corrected at settlement.
    req.tokens = quota.reservation_tokens(body_bytes=len(body), completion_bound=bound,
                                          max_model_len=route.max_model_len)
    req.estimate = len(body) // 4 + bound
    key = req.key
    req.row = UsageRow(
        request_id=ex.request_id, team_id=key.team_id, member_id=key.member_id, api_key_id=key.key_id,
        period_start=None, endpoint=endpoint, model=route.public_name, started_at=timezone.now(), stream=req.stream,
    )
    return req


def log_request(req: Request) -> None:
    """One structured line and the metrics for every authenticated request (never the prompt or the key)."""
    ex, row, usage = req.ex, req.row, req.usage
    overhead = ex.overhead_ms()
    observe(model=row.model, member=req.key.username, status=row.status, prompt=usage.prompt_tokens,
            completion=usage.completion_tokens, duration_s=row.duration_ms / 1000,
            ttft_s=row.ttft_ms / 1000 if row.ttft_ms is not None else None, overhead_s=overhead / 1000)
    log.info(
        "request_id=%s member=%s model=%s upstream=%s status=%s http=%s stream=%s prompt=%s completion=%s "
        "ttft_ms=%s duration_ms=%.1f overhead_ms=%.2f",
        ex.request_id, req.key.username, row.model, row.upstream or "-", row.status, row.http_status,
        row.stream, usage.prompt_tokens, usage.completion_tokens,
        f"{row.ttft_ms:.1f}" if row.ttft_ms is not None else "-", row.duration_ms, overhead,
    )
