"""A lean HTTP/1.1 client for the gateway's requests to one upstream.

The gateway sends one kind of request (a JSON POST) to a server it knows, and
reads back a JSON body or an SSE stream. aiohttp's general client cost ~290 µs of
CPU per request on the development VM; this one, an asyncio Protocol per
keep-alive connection with httptools (uvicorn's C parser) reading the responses,
costs ~80. aiohttp still serves the health checks.

Semantics kept from aiohttp: a connect timeout, a read timeout between two reads,
keep-alive connections reused only after a complete response, a reused connection
that the server had already closed retried once on a new one (nothing was
received, so the upstream never saw the request), and `close()` drops the
connection at once so that vLLM aborts the request.
"""
from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import urlsplit

import httptools

PAUSE_AT = 1 << 20  # bytes buffered before reading from the upstream pauses


class UpstreamError(Exception):
    """The upstream could not be reached or broke off (a 502/503 for the client)."""


class UpstreamConnectError(UpstreamError):
    """No connection (refused, unreachable, connect timeout): the upstream is down."""


class UpstreamDisconnected(UpstreamError):
    """The connection closed before the response was complete."""


class UpstreamTimeout(UpstreamError, asyncio.TimeoutError):
    """Nothing arrived from the upstream for the read timeout."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; answers one request at a time."""

    def __init__(self, client: UpstreamHTTP) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.response: Response | None = None

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.abort()  # nothing was asked: a server talking out of turn
            return
        response.received = True
        response.touch()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            response.fail(UpstreamDisconnected("malformed response"))
            self.abort()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.response is not None and not self.response.complete:
            self.response.fail(UpstreamDisconnected("connection closed"))

    def pause_writing(self) -> None:  # requests are small; nothing to do
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks
    def on_headers_complete(self) -> None:
        response = self.response
        response.status = self.parser.get_status_code()
        if not response.headers.done():
            response.headers.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.response.feed(body)

    def on_message_complete(self) -> None:
        self.response.finish(self.parser.should_keep_alive())

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Response:
    """The subset of aiohttp.ClientResponse the gateway uses: status, read(), iter_any(), release(), close()."""

    def __init__(self, conn: _Connection, read_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.conn = conn
        self.status = 0
        self.headers: asyncio.Future = loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.received = False  # any byte of the response arrived
        self.error: BaseException | None = None
        self.waiter: asyncio.Future | None = None
        self.paused = False
        self.released = False
        self.read_timeout = read_timeout
        self.deadline = loop.time() + read_timeout
        self.timer = loop.call_at(self.deadline, self._check_timeout)

    # fed by the connection
    def touch(self) -> None:
        self.deadline = asyncio.get_running_loop().time() + self.read_timeout

    def _check_timeout(self) -> None:
        loop = asyncio.get_running_loop()
        if self.complete or self.error is not None:
            return
        if loop.time() >= self.deadline:
            self.fail(UpstreamTimeout(f"no data for {self.read_timeout:g} s"))
            self.conn.abort()
        else:
            self.timer = loop.call_at(self.deadline, self._check_timeout)

    def feed(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_AT and not self.paused and self.conn.transport is not None:
            self.paused = True
            self.conn.transport.pause_reading()
        self._wake()

    def finish(self, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        self.timer.cancel()
        if self.released:
            self._recycle()
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self.complete or self.error is not None:
            return
        self.error = exc
        self.timer.cancel()
        if not self.headers.done():
            self.headers.set_exception(exc)
            self.headers.exception()  # retrieved: a caller may be gone
        if self.released:
            self._recycle()
        self._wake()

    def _recycle(self) -> None:
        """Back to the pool after a complete response; any other end drops the connection."""
        conn = self.conn
        conn.response = None
        if self.complete and self.keep_alive and self.error is None and not conn.closed:
            conn.client.idle.append(conn)
        else:
            conn.abort()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # read by the gateway
    async def _more(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    def _take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.conn.transport is not None:
            self.paused = False
            self.conn.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        parts = []
        while not self.complete:
            if self.error is not None:
                raise self.error
            if self.chunks:
                parts.append(self._take())  # past PAUSE_AT reading pauses until taken: take, and it resumes
            else:
                await self._more()
        if self.chunks:
            parts.append(self._take())
        return b"".join(parts) if len(parts) != 1 else parts[0]

    async def iter_any(self):
        """The body as it arrives, in whatever pieces (like aiohttp's content.iter_any())."""
        while True:
            if self.chunks:
                yield self._take()
            elif self.complete:
                return
            elif self.error is not None:
                raise self.error
            else:
                await self._more()

    def release(self) -> None:
        """Done with the response. The connection goes back to the pool when the response is complete
        (at once, or when its last bytes arrive: a stream's end follows its [DONE]); else it is dropped."""
        self.released = True
        self.chunks.clear()
        if self.complete or self.error is not None:
            self.timer.cancel()
            self._recycle()

    def close(self) -> None:
        """Drop the connection now (the upstream sees the disconnect and aborts the request)."""
        self.timer.cancel()
        self.fail(UpstreamDisconnected("closed by the gateway"))
        self.conn.response = None
        self.conn.abort()


class UpstreamHTTP:
    """Keep-alive connections to one upstream's base URL (http://, or https:// with verified TLS)."""

    def __init__(self, base_url: str, api_key: str | None, connect_timeout: float, read_timeout: float) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"upstream URL must be http:// or https://: {base_url}")
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.host, self.port = url.hostname, url.port or (443 if self.ssl else 80)
        self.base_path = url.path.rstrip("/")
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        host = url.netloc.encode()
        auth = b"Authorization: Bearer " + api_key.encode() + b"\r\n" if api_key else b""
        self._headers = b"Host: " + host + b"\r\nContent-Type: application/json\r\n" + auth
        self.idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self.ssl)
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: {exc!r}") from None
        return conn

    async def post(self, path: str, body: bytes, request_id: str) -> Response:
        """POST body to base_url + path; the response once its headers arrived."""
        request = b"".join((
            b"POST ", (self.base_path + path).encode(), b" HTTP/1.1\r\n", self._headers,
            b"X-Request-Id: ", request_id.encode(), b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n\r\n",
            body,
        ))
        while True:
            conn = None
            while self.idle:
                candidate = self.idle.pop()
                if not candidate.closed and not candidate.transport.is_closing():
                    conn = candidate
                    break
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            response = Response(conn, self.read_timeout)
            conn.response = response
            conn.parser = httptools.HttpResponseParser(conn)
            conn.transport.write(request)
            try:
                await response.headers
            except UpstreamDisconnected:
                response.timer.cancel()
                conn.response = None
                if reused and not response.received:
                    continue  # the server had closed the idle connection: once more on a new one
                raise
            except BaseException:
                response.close()
                raise
            return response

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.abort()
