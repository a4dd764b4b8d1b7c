"""The HTTP side of the simulator: aiohttp.web routes, auth, faults, SSE streaming.

aiohttp.web was measured faster than a raw ASGI app on uvicorn+httptools for
non-streamed requests (see README.md) and gives direct access to the transport, which
the ``refuse`` and ``cut`` faults need. ``handler_cancellation=True`` makes a client
disconnect cancel the handler (also while it waits in the queue), which is how aborts
are detected.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from . import protocol as p
from .config import FAULTS, SimConfig
from .engine import CONTROL_KEYS, Engine, FaultStop
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .tokens import TOKEN_RE, token_ids

log = logging.getLogger("proxy.simulator")

FAULT_HEADER = "x-sim-fault"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}
JSON = "application/json"
_FOREVER = 3600.0


class _Respond(Exception):
    """Short-circuit a handler with a ready response."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__()
        self.response = response


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=JSON)


class Simulator:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg)
        served = cfg.served_names
        self.default_model = served[0]
        self.names = {name: served[0] for name in served}
        self.names.update({lora.name: lora.name for lora in cfg.lora_modules})
        self.auth_values = [f"Bearer {k}".encode() for k in cfg.api_key]
        self.flat_errors = cfg.error_format == "flat"
        self._embedder: p.Embedder | None = None
        self.models_body = orjson.dumps(self._model_cards())

    # -- plumbing ---------------------------------------------------------------------
    def error(self, exc: p.ApiError) -> web.Response:
        return web.Response(status=exc.status, body=exc.body(self.flat_errors), content_type=JSON)

    def _fault(self, request: web.Request) -> str | None:
        fault = request.headers.get(FAULT_HEADER)
        if fault is None:
            return self.engine.ctl.fault
        if fault not in FAULTS:
            raise p.bad_request(f"Unknown {FAULT_HEADER} {fault!r}; one of {', '.join(FAULTS)}", FAULT_HEADER)
        return fault

    async def _drop(self, request: web.Request, reason: str | None) -> None:
        """Close the connection without finishing the response; wait to be cancelled.

        `reason`: the fault to count (None: counted already)."""
        if reason:
            self.engine.count_fault(reason)
        if request.transport is not None:
            request.transport.close()
        await asyncio.sleep(_FOREVER)  # aiohttp cancels the handler when the connection is lost
        raise _Respond(web.Response(status=500))

    async def _prologue(self, request: web.Request) -> str | None:
        """Connection-level faults, then auth, then the dead-engine check. Returns the fault."""
        fault = self._fault(request)
        if fault == "refuse":
            await self._drop(request, "refuse")
        elif fault == "hang":
            self.engine.count_fault("hang")
            await asyncio.sleep(_FOREVER)  # until the client goes away
        elif fault == "html_502":  # a reverse proxy in front of vLLM answers for it
            self.engine.count_fault("html_502")
            raise _Respond(web.Response(status=502, body=p.HTML_502, content_type="text/html"))
        if self.auth_values:
            got = request.headers.get("Authorization", "").encode()
            if not any(hmac.compare_digest(got, want) for want in self.auth_values):
                raise _Respond(_json({"error": "Unauthorized"}, 401))
        if fault == "500" or self.engine.ctl.dead:
            self.engine.count_fault("500" if fault == "500" else "dead")
            raise _Respond(web.Response(status=500))
        if fault:
            self.engine.count_fault(fault)
        return fault

    def _resolve(self, body: dict[str, Any]) -> str:
        return p.resolve_model(body, self.names, self.default_model)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        return p.parse_json(await request.read(), request.headers.get("Content-Type", ""))

    # -- generation ---------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._gen(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._gen(request, chat=False)

    async def _gen(self, request: web.Request, chat: bool) -> web.StreamResponse:
        cfg, ctl = self.cfg, self.engine.ctl
        try:
            fault = await self._prologue(request)
            if cfg.pooling:
                raise p.unsupported_api("Chat Completions" if chat else "Completions")
            body = await self._body(request)
            make = p.chat_job if chat else p.completion_job
            job = make(body, resolve=self._resolve, max_model_len=cfg.max_model_len, response_tokens=ctl.response_tokens,
                       force_usage=cfg.enable_force_include_usage)
        except p.ApiError as exc:
            return self.error(exc)
        except _Respond as r:
            return r.response
        rid = p.new_id("chatcmpl-" if chat else "cmpl-", request.headers.get("X-Request-Id"))
        created = int(time.time())
        lengths = [c.length for c in job.choices]
        reasons = [c.finish_reason for c in job.choices]
        if job.stream:
            return await self._stream(request, job, rid, created, chat, fault, lengths, reasons)

        on_step = None
        if fault in ("cut", "error_chunk"):
            total = max(lengths)
            stop_reason = "abort" if fault == "cut" else "error"

            async def on_step(prev: int, pos: int) -> None:
                if pos >= total:
                    raise FaultStop(stop_reason)

        result = await self.engine.execute(job.prompt_tokens, lengths, reasons, on_step)
        build = p.chat_response if chat else p.completion_response
        return await self._finish_json(request, result, fault, lambda: build(job, rid, created))

    async def _finish_json(self, request: web.Request, result: str | None, fault: str | None,
                           build: Callable[[], dict]) -> web.StreamResponse:
        if result == "error" or (result is None and fault == "error_chunk"):
            return self.error(p.ApiError(500, "Internal server error", "InternalServerError"))
        if fault == "garbage":
            return web.Response(body=p.GARBAGE_BODY, content_type=JSON)
        if fault == "huge_line":
            resp = web.StreamResponse(headers={"Content-Type": JSON})
            await resp.prepare(request)
            await self._huge_line(resp.write, b'{"id":"')
            await self._drop(request, None)
            return resp
        payload = orjson.dumps(build())
        if fault != "cut":
            return web.Response(body=payload, content_type=JSON)
        resp = web.StreamResponse(headers={"Content-Type": JSON})
        resp.content_length = len(payload)
        await resp.prepare(request)
        await resp.write(payload[: len(payload) // 2])
        await self._drop(request, "cut")
        return resp

    @staticmethod
    async def _huge_line(write: Callable[[bytes], Awaitable[None]], head: bytes) -> None:
        """The huge_line fault: `head`, then 10 MB without a newline (in 1 MB writes)."""
        await write(head)
        piece = b"x" * (1 << 20)
        for _ in range(p.HUGE_LINE_BYTES // len(piece)):
            await write(piece)

    async def _stream(self, request: web.Request, job: p.GenJob, rid: str, created: int, chat: bool,
                      fault: str | None, lengths: list[int], reasons: list[str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)  # vLLM sends the 200 and headers before the request is scheduled
        writer = p.ChunkWriter(job, rid, created, chat)
        write = resp.write
        on_step: Callable[[int, int], Awaitable[None]]
        if fault in ("cut", "error_chunk", "garbage", "huge_line"):
            per_chunk = max(1, self.engine.ctl.tokens_per_chunk)
            steps = 1 + -(-(max(lengths) - 1) // per_chunk)
            fault_at = min(3, steps - 1)
            counter = [0]

            async def on_step(prev: int, pos: int) -> None:
                n = counter[0]
                counter[0] += 1
                if n == fault_at:
                    if fault == "cut":
                        raise FaultStop("abort")
                    if fault == "error_chunk":
                        raise FaultStop("error")
                    if fault == "huge_line":
                        await self._huge_line(write, b"data: ")
                        raise FaultStop("abort")
                    await write(p.GARBAGE_EVENT)
                await write(writer.step(prev, pos))
        else:
            def on_step(prev: int, pos: int) -> Awaitable[None]:
                return write(writer.step(prev, pos))

        result = await self.engine.execute(job.prompt_tokens, lengths, reasons, on_step)
        if result is None:
            await write((writer.usage_event() if job.include_usage else b"") + p.DONE)
        elif result == "error":
            await write(p.ERROR_EVENT + p.DONE)
        else:
            try:
                await self._drop(request, None if fault == "huge_line" else "cut")
            except _Respond:
                pass
            return resp
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        cfg = self.cfg
        try:
            fault = await self._prologue(request)
            if not cfg.pooling:
                raise p.unsupported_api("Embeddings")
            body = await self._body(request)
            items = p.embedding_inputs(body)
            model = p.resolve_model(body, self.names, self.default_model)
            if body.get("encoding_format") not in (None, "float", "base64"):
                raise p.validation_error("Input should be 'float' or 'base64'", "encoding_format", "literal_error")
            for _, n in items:
                if n > cfg.max_model_len:
                    raise p.bad_request(
                        f"This model's maximum context length is {cfg.max_model_len} tokens. However, you "
                        f"requested {n} tokens in the input for embedding generation. Please reduce the length "
                        f"of the input.", "input_tokens")
        except p.ApiError as exc:
            return self.error(exc)
        except _Respond as r:
            return r.response
        if self._embedder is None:
            self._embedder = p.Embedder(cfg.embedding_dim)
        rid = p.new_id("embd-", request.headers.get("X-Request-Id"))
        prompt = sum(n for _, n in items)
        result = await self.engine.execute(prompt, [0] * len(items), ["stop"] * len(items), None)
        try:
            return await self._finish_json(
                request, result, fault, lambda: p.embedding_response(self._embedder, body, items, model, rid))
        except p.ApiError as exc:
            return self.error(exc)

    # -- other endpoints ------------------------------------------------------------------
    def _model_cards(self) -> dict[str, Any]:
        created = int(time.time())
        perm = {"id": "modelperm-sim", "object": "model_permission", "created": created,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False}

        def card(name: str, root: str, parent: str | None, max_len: int | None) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": root,
                    "parent": parent, "max_model_len": max_len, "permission": [perm]}

        data = [card(n, self.cfg.model, None, self.cfg.max_model_len) for n in self.cfg.served_names]
        data += [card(lo.name, lo.path, lo.base_model_name or self.default_model, None)
                 for lo in self.cfg.lora_modules]
        return {"object": "list", "data": data}

    async def models(self, request: web.Request) -> web.StreamResponse:
        try:
            await self._prologue(request)
        except p.ApiError as exc:
            return self.error(exc)
        except _Respond as r:
            return r.response
        return web.Response(body=self.models_body, content_type=JSON)

    async def health(self, request: web.Request) -> web.Response:
        ctl = self.engine.ctl
        if (request.headers.get(FAULT_HEADER) or ctl.fault) == "slow_health":
            await asyncio.sleep(ctl.health_delay_s)
        return web.Response(status=503 if ctl.dead else 200)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": self.cfg.version})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.engine.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            p.resolve_model(body, self.names, self.default_model)
            messages = body.get("messages")
            if messages is not None:
                if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                    raise p.validation_error("Input should be a valid list", "messages", "list_type")
                ids = token_ids(messages=messages)
                strs = None
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise p.validation_error("Field required", "prompt", "missing")
                ids = token_ids(prompt=prompt)
                strs = TOKEN_RE.findall(prompt) if body.get("return_token_strs") else None
        except p.ApiError as exc:
            return self.error(exc)
        return _json({"count": len(ids), "max_model_len": self.cfg.max_model_len, "tokens": ids,
                      "token_strs": strs})

    async def sim_stats(self, request: web.Request) -> web.Response:
        return _json(self.engine.stats_dict())

    async def sim_control(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                changes = p.parse_json(await request.read(), request.headers.get("Content-Type", JSON))
                self.engine.update_control(_check_control(changes))
            except p.ApiError as exc:
                return self.error(exc)
        return _json(vars(self.engine.ctl))

    async def not_found(self, request: web.Request) -> web.Response:
        known = {r.resource.canonical for r in request.app.router.routes() if r.resource is not None}
        if request.path in known:
            return _json({"detail": "Method Not Allowed"}, 405)
        return _json({"detail": "Not Found"}, 404)


def _check_control(changes: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in CONTROL_KEYS:
            raise p.bad_request(f"unknown control key {key!r}; known: {', '.join(CONTROL_KEYS)}", key)
        if key == "fault":
            if value is not None and value not in FAULTS:
                raise p.bad_request(f"unknown fault {value!r}; one of {', '.join(FAULTS)}", key)
        elif key == "dead":
            if not isinstance(value, bool):
                raise p.bad_request("dead must be a boolean", key)
        elif key in ("tokens_per_chunk", "response_tokens", "max_num_seqs"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise p.bad_request(f"{key} must be an integer >= 1", key)
        elif not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise p.bad_request(f"{key} must be a number >= 0", key)
        out[key] = value
    return out


def build_app(cfg: SimConfig) -> web.Application:
    """The aiohttp application; ``app["simulator"]`` is the ``Simulator`` (engine, stats)."""
    sim = Simulator(cfg)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["simulator"] = sim
    r = app.router
    r.add_post("/v1/chat/completions", sim.chat)
    r.add_post("/v1/completions", sim.completions)
    r.add_post("/v1/embeddings", sim.embeddings)
    r.add_get("/v1/models", sim.models)
    r.add_get("/health", sim.health)
    r.add_get("/ping", sim.health)
    r.add_post("/ping", sim.health)
    r.add_get("/version", sim.version)
    r.add_get("/metrics", sim.metrics)
    r.add_post("/tokenize", sim.tokenize)
    r.add_get("/sim/stats", sim.sim_stats)
    r.add_get("/sim/control", sim.sim_control)
    r.add_post("/sim/control", sim.sim_control)
    r.add_route("*", "/{tail:.*}", sim.not_found)
    return app


async def serve(cfg: SimConfig, stop: asyncio.Event, on_ready: Callable[[int], None] | None = None,
                app: web.Application | None = None) -> None:
    """Serve until ``stop`` is set. ``on_ready(port)`` gets the bound port (``--port 0`` works)."""
    app = app if app is not None else build_app(cfg)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port, backlog=4096, reuse_address=True)
        await site.start()
        port = runner.addresses[0][1]
        if on_ready is not None:
            on_ready(port)
        await stop.wait()
    finally:
        await runner.cleanup()
