"""The OpenAI-compatible /v1 gateway: the whole request path, a lean ASGI app in front of vLLM.

qwenhub.asgi sends every /v1 request (and /metrics) here; everything else goes to Django.
Nothing on this path goes through Django's middleware or its sync machinery. One request is
one ``Request`` moving through stages, and settlement always runs:

    app.py           Gateway, the ASGI app: dispatch, the stages, /v1/models, /metrics
    request.py       Request and the plan stage: key, body, route, what the request may cost
    keys.py          authentication from a per-process cache; last use flushed in batches
    limits.py        rate limits (requests/min, tokens/min, concurrency) in Redis
    fairness/        the fair queue: per-member queues in front of each upstream's capacity
    redis_link.py    the process's one Redis client for both, and the fallback policy
    ledger/          quota reservation and settlement: PostgreSQL (asyncpg) or SQLite back-end
    forwarding.py    an upstream call: slot, connection, answer or error, given back once
    upstream.py      the routing table and upstreams' health
    upstream_http.py the lean HTTP/1.1 client to vLLM
    relay.py         stream relay: usage asked of vLLM, hidden from clients that did not ask
    exchange.py      the ASGI connection: body, answer, the client leaving
    errors.py        the error catalogue: status, type, code, headers and usage status
    observability.py Prometheus metrics
    db.py            ORM work in a thread, a 503 when the database is unavailable
"""
from proxy.gateway.app import Gateway

__all__ = ["Gateway"]
