"""The gateway's upstream HTTP client against the simulator and against small misbehaving servers."""
import asyncio

import orjson
import pytest

from proxy.gateway.tests.conftest import free_port
from proxy.gateway.upstream_http import UpstreamConnectError, UpstreamDisconnected, UpstreamHTTP, UpstreamTimeout
from proxy.simulator.testing import start_simulator

CHAT = {"model": "Qwen/Qwen2.5-7B-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def sim():
    with start_simulator("--ttft-ms", "0", "--itl-ms", "0") as handle:
        yield handle


def test_json_and_stream_answers_on_one_reused_connection(sim):
    async def run():
        client = UpstreamHTTP(sim.base_url, None, connect_timeout=2, read_timeout=5)
        try:
            first = await client.post("/chat/completions", orjson.dumps(CHAT), "req-1")
            assert first.status == 200
            body = orjson.loads(await first.read())
            first.release()
            conn = first.conn
            assert client.idle == [conn]
            stream = await client.post("/chat/completions", orjson.dumps(dict(CHAT, stream=True)), "req-2")
            assert stream.conn is conn  # kept alive and reused
            raw = b"".join([piece async for piece in stream.iter_any()])
            stream.release()
            assert client.idle == [conn]
            missing = await client.post("/chat/completions", orjson.dumps(dict(CHAT, model="nope")), "req-3")
            error = orjson.loads(await missing.read())
            missing.release()
            return body, raw, missing.status, error
        finally:
            await client.close()

    body, raw, status, error = asyncio.run(run())
    assert body["usage"]["completion_tokens"] == 3
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"data: ") == 5  # role+3 tokens+final, [DONE]
    assert status == 404 and "nope" in error["error"]["message"]


def test_a_stream_released_at_done_rejoins_the_pool_when_it_ends(sim):
    async def run():
        client = UpstreamHTTP(sim.base_url, None, connect_timeout=2, read_timeout=5)
        try:
            response = await client.post("/chat/completions", orjson.dumps(dict(CHAT, stream=True)), "r")
            async for piece in response.iter_any():
                if b"[DONE]" in piece:
                    break
            response.release()  # the chunked terminator may still be on its way
            for _ in range(100):
                if client.idle:
                    break
                await asyncio.sleep(0.01)
            return client.idle == [response.conn]
        finally:
            await client.close()

    assert asyncio.run(run())


async def _serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def _read_request(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return head


def test_a_reused_connection_closed_before_any_answer_is_retried_on_a_new_one():
    served = []

    async def handler(reader, writer):
        # Answers one request per connection, then closes the next one unanswered, as a server
        # does when its keep-alive timeout strikes just as a request arrives.
        served.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        try:
            await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async def run():
        server, url = await _serve(handler)
        client = UpstreamHTTP(url, "secret", connect_timeout=2, read_timeout=5)
        try:
            first = await client.post("/chat/completions", b"{}", "a")
            assert await first.read() == b"{}"
            first.release()
            stale = client.idle[0]
            second = await client.post("/chat/completions", b"{}", "b")
            assert await second.read() == b"{}"
            second.release()
            return second.conn is not stale
        finally:
            await client.close()
            server.close()

    assert asyncio.run(run())
    assert len(served) == 2  # the retried request reached the server once more, on a new connection
    assert b"POST /v1/chat/completions HTTP/1.1" in served[0]
    assert b"Authorization: Bearer secret" in served[0] and b"X-Request-Id: a" in served[0]
    assert b"X-Request-Id: b" in served[1]


def test_refused_silent_and_broken_upstreams():
    async def silent(reader, writer):
        await _read_request(reader)
        await asyncio.sleep(5)

    async def broken(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        writer.close()

    async def run():
        refused = UpstreamHTTP(f"http://127.0.0.1:{free_port()}/v1", None, connect_timeout=1, read_timeout=1)
        with pytest.raises(UpstreamConnectError):
            await refused.post("/chat/completions", b"{}", "x")

        server, url = await _serve(silent)
        client = UpstreamHTTP(url, None, connect_timeout=1, read_timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await client.post("/chat/completions", b"{}", "x")
        assert 0.15 < loop.time() - started < 1.5
        server.close()

        server, url = await _serve(broken)
        client = UpstreamHTTP(url, None, connect_timeout=1, read_timeout=2)
        response = await client.post("/chat/completions", b"{}", "x")
        pieces = []
        with pytest.raises(UpstreamDisconnected):
            async for piece in response.iter_any():
                pieces.append(piece)
        response.release()
        server.close()
        return pieces, client.idle

    pieces, idle = asyncio.run(run())
    assert b"".join(pieces) == b"hello" and idle == []  # a broken connection is never reused


async def _stream_bytes(sim, body: dict) -> bytes:
    """The raw bytes of a streamed answer of the simulator, through UpstreamHTTP."""
    client = UpstreamHTTP(sim.base_url, None, connect_timeout=2, read_timeout=5)
    try:
        response = await client.post("/chat/completions", orjson.dumps(body), "r")
        raw = b"".join([piece async for piece in response.iter_any()])
        response.release()
        return raw
    finally:
        await client.close()


@pytest.mark.parametrize("public", ["Qwen/Qwen2.5-7B-Instruct", "qwen-public"])
def test_the_relays_byte_path_gives_what_its_json_path_gives(sim, public):
    """The fast cut of per-chunk usage (chat, one choice) matches the full parse, event by event."""
    from proxy.gateway.relay import _StreamRelay
    from proxy.gateway.ledger import Usage

    body = dict(CHAT, max_tokens=6, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})

    raw = asyncio.run(_stream_bytes(sim, body))
    outputs = {}
    for fast in (True, False):
        for wants_usage in (True, False):
            usage = Usage()
            relay = _StreamRelay(usage, "chat", wants_usage, False, CHAT["model"], public)
            relay._fast = fast
            out = relay.feed(raw)
            assert relay.done
            events = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]
            outputs[fast, wants_usage] = (events, usage.prompt_tokens, usage.completion_tokens)
    for wants_usage in (True, False):
        assert outputs[True, wants_usage] == outputs[False, wants_usage]
        events, prompt, completion = outputs[True, wants_usage]
        assert completion == 6 and prompt > 0
        assert all(e["model"] == public for e in events)
        assert all("usage" not in e for e in events if e["choices"])  # per-chunk usage cut
        assert any(not e["choices"] for e in events) == wants_usage  # the final usage chunk only if asked


def test_a_json_answer_larger_than_the_read_buffer_is_read_whole():
    """Past PAUSE_AT buffered bytes reading pauses; read() must take them and resume, not wait for the timeout."""
    from proxy.gateway.upstream_http import PAUSE_AT

    async def run():
        client = UpstreamHTTP(embedder.base_url, None, connect_timeout=2, read_timeout=3)
        try:
            body = {"model": "BAAI/bge-m3", "input": [f"text number {i}" for i in range(100)]}
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await client.post("/embeddings", orjson.dumps(body), "req-big")
            raw = await response.read()
            response.release()
            return response.status, raw, loop.time() - started
        finally:
            await client.close()

    with start_simulator("--model", "BAAI/bge-m3", "--runner", "pooling") as embedder:
        status, raw, seconds = asyncio.run(run())
    assert status == 200 and len(raw) > 2 * PAUSE_AT
    assert len(orjson.loads(raw)["data"]) == 100
    assert seconds < 3  # not ended by the read timeout


def test_the_relay_gives_the_same_events_whatever_the_pieces_and_a_huge_line_costs_linear_time(sim):
    """Events split anywhere (even between the two newlines) re-frame as when whole; a 10 MB line in 4 KB
    reads is held and joined once, not copied and rescanned at every read (seconds of a blocked event loop)."""
    import time

    from proxy.gateway.ledger import Usage
    from proxy.gateway.relay import _StreamRelay

    body = dict(CHAT, max_tokens=8, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})

    raw = asyncio.run(_stream_bytes(sim, body))

    def relay_in(size: int, data: bytes) -> tuple[bytes, int, bool]:
        usage = Usage()
        relay = _StreamRelay(usage, "chat", True, False, CHAT["model"], "public")
        out = []
        for i in range(0, len(data), size):  # as relay_stream reads: until the relay is finished
            out.append(relay.feed(data[i:i + size]))
            if relay.finished:
                break
        return b"".join(out), usage.completion_tokens, relay.done

    whole = relay_in(len(raw), raw)
    assert whole[1] == 8 and whole[2] and whole[0].endswith(b"data: [DONE]\n\n")
    for size in (1, 2, 7, 64):
        assert relay_in(size, raw) == whole
    assert relay_in(1, b"data: {\"a\": 1}\n") == (b"", 0, False)  # an unfinished event is held, not sent

    huge = b"data: " + b"x" * (10 << 20) + b"\n\n" + raw
    started = time.process_time()
    out, _, done = relay_in(4 << 10, huge)
    assert time.process_time() - started < 1.5  # about 0.1 s; copied and rescanned at each read: over 10 s
    assert out == b"" and not done  # the garbage line ends the relay (relay_stream answers the error event)
