"""Streaming answers: the upstream's server-sent events re-framed for the client.

``relay_stream`` passes vLLM's SSE stream on as it arrives; ``_StreamRelay`` re-frames it chunk by
chunk, collecting usage and hiding what the client did not ask for. A stream the upstream breaks
off ends with the catalogue's error event and ``[DONE]``. The SSE response headers and the
``[DONE]`` terminator are defined here.
"""
import orjson

from proxy.gateway import errors
from proxy.gateway.ledger import Usage
from proxy.gateway.upstream_http import Response, UpstreamError

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
DONE = b"data: [DONE]\n\n"


async def relay_stream(req, response: Response, relay: "_StreamRelay") -> None:
    """Send the upstream's events to the client of req (a ``request.Request``) as they come, then end the stream."""
    ex, row = req.ex, req.row
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
        row.status, row.http_status = errors.Status.UPSTREAM_ERROR, 502
        await ex.body((b"" if relay.failed else errors.stream_broken_event(req.route.public_name)) + DONE, False)
        return
    await ex.body(b"", False)


class _StreamRelay:
    """Re-frames an upstream SSE stream for the client, collecting usage on the way.

    The gateway always asks vLLM for include_usage + continuous_usage_stats; the
    client gets exactly what vLLM would have sent for its own stream_options: the
    per-chunk usage and the usage-only chunk are removed unless it asked for them.
    """

    __slots__ = ("usage", "chat", "wants_usage", "wants_running", "served", "public", "held", "done",
                 "failed", "finished", "_swap", "_fast", "_model_from", "_model_to")

    def __init__(self, usage: Usage, endpoint: str, wants_usage: bool, wants_running: bool,
                 served: str, public: str, choices: int = 1) -> None:
        self.usage = usage
        self.chat = endpoint == "chat"
        self.wants_usage, self.wants_running = wants_usage, wants_running
        self.served, self.public = served, public
        self._swap = served != public
        # The common case (a chat stream, one choice, no per-chunk usage for the client) is
        # cut as bytes: vLLM puts a chunk's usage last, so it is the tail `,"usage":{...}}`.
        self._fast = self.chat and choices == 1 and not wants_running
        self._model_from = b'"model":' + orjson.dumps(served)
        self._model_to = b'"model":' + orjson.dumps(public)
        # The pieces of an event not ended yet, joined once it ends: an event arriving in many reads
        # (a huge line) costs time linear in its size, not quadratic.
        self.held: list[bytes] = []
        self.done = False  # [DONE] seen
        self.failed = False  # the upstream sent an error event (already relayed with [DONE])
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        held = self.held
        if b"\n\n" not in data and not (held and data[:1] == b"\n" and held[-1][-1:] == b"\n"):
            if data:
                held.append(data)
            return b""
        if held:
            held.append(data)
            data = b"".join(held)
            held.clear()
        *events, rest = data.split(b"\n\n")
        if rest:
            held.append(rest)
        out = []
        for event in events:
            piece = self._event(event)
            if piece is not None:
                out.append(piece)
            if self.finished:
                break
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        if not event.startswith(b"data: "):
            return event + b"\n\n" if event.strip() else None
        payload = event[6:]
        if payload == b"[DONE]":
            self.done = self.finished = True
            return DONE
        if self._fast and payload.endswith(b"}}"):
            cut = payload.rfind(b',"usage":{')
            if cut > 0 and b'"choices":[]' not in payload and b'"error"' not in payload[:cut]:
                try:
                    usage = orjson.loads(payload[cut + 9:-1])
                except orjson.JSONDecodeError:
                    usage = None
                if isinstance(usage, dict):
                    self.usage.take_running(0, usage)
                    out = payload[:cut] + b"}"
                    if self._swap:
                        out = out.replace(self._model_from, self._model_to, 1)
                    return b"data: " + out + b"\n\n"
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.finished = True  # garbage: the relay ends with an error event
            return None
        if not isinstance(obj, dict):
            self.finished = True
            return None
        if "error" in obj:
            self.failed = self.finished = True
            return event + b"\n\n"
        usage = obj.get("usage")
        choices = obj.get("choices")
        if isinstance(usage, dict):
            if not choices:
                self.usage.take(usage)
                if not self.wants_usage:
                    return None
            else:
                self.usage.take_running(choices[0].get("index", 0), usage)
        changed = False
        if isinstance(usage, dict) and choices and not self.wants_running:
            if self.chat:
                del obj["usage"]
            else:
                obj["usage"] = None
            changed = True
        if self._swap and obj.get("model") == self.served:
            obj["model"] = self.public
            changed = True
        if not changed:
            return event + b"\n\n"
        return b"data: " + orjson.dumps(obj) + b"\n\n"
