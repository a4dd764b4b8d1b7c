"""One /v1 request on the ASGI connection: reading the body, sending the answer, noticing the client leave.

``Exchange`` carries the request id, the timing that yields the ``x-qwenhub-overhead-ms`` header
and the ASGI send/receive calls; ``ClientGone`` is raised when the client has closed the
connection. ``OVERHEAD_HEADER`` and ``JSON_HEADERS`` (the default headers of an answer) are here too.
"""
import asyncio
import secrets
import time

from proxy.gateway import errors

OVERHEAD_HEADER = b"x-qwenhub-overhead-ms"
JSON_HEADERS = [(b"content-type", b"application/json")]


class ClientGone(Exception):
    """The client closed the connection."""


class Exchange:
    """One /v1 request as the gateway handles it."""

    __slots__ = ("scope", "receive", "send", "request_id", "t0", "upstream_wait", "headers_sent", "out_headers",
                 "gone", "complete")

    def __init__(self, scope, receive, send) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.request_id = "req_" + secrets.token_hex(16)
        self.t0 = time.perf_counter()
        self.upstream_wait = 0.0  # seconds spent waiting on the upstream
        self.headers_sent = False
        self.out_headers: list[tuple[bytes, bytes]] = []
        self.gone = False  # the client disconnected before the response was complete
        self.complete = False  # the last byte of the response was handed to the server

    async def watch_disconnect(self, task: asyncio.Task) -> None:
        """Cancel task when the client goes away, so the upstream request is dropped at once."""
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if not self.complete:
            self.gone = True
            task.cancel()

    async def body(self, data: bytes, more: bool) -> None:
        if not more:
            self.complete = True
        try:
            await self.send({"type": "http.response.body", "body": data, "more_body": more})
        except OSError:
            self.gone = True
            raise ClientGone() from None

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1000

    def overhead_ms(self) -> float:
        return self.elapsed_ms() - self.upstream_wait * 1000

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        headers = headers + self.out_headers + [
            (b"x-request-id", self.request_id.encode()),
            (OVERHEAD_HEADER, f"{self.overhead_ms():.2f}".encode()),
        ]
        self.headers_sent = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def respond(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = JSON_HEADERS) -> None:
        await self.start(status, headers)
        await self.body(body, False)

    async def read_body(self, limit: int, timeout: float) -> bytes:
        """The whole body, at most `limit` bytes, within `timeout` seconds (a stalled upload is a 408)."""
        chunks, size = [], 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise errors.body_too_large(limit)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise errors.body_timeout(timeout) from None
