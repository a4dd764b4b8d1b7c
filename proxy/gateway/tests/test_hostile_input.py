"""Hostile input on /v1 against the live gateway: always a 4xx in OpenAI's error shape, never a 5xx or a hang.

Hypothesis writes the bodies and headers (unicode, NUL bytes, huge and negative numbers,
wrong types, deep nesting, invalid UTF-8); fixed cases cover what a generator rarely reaches
(a 100 KB Authorization header, a body over the limit, an upload that stalls half way).
"""
import json
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing.models import UsageRecord
from proxy.gateway.tests.conftest import MODEL, GatewayProcess

pytestmark = pytest.mark.django_db(transaction=True)
HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TIMEOUT = httpx.Timeout(10.0)  # a hang fails the test instead of stalling the suite

scalars = (st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
MESSAGES = [{"role": "user", "content": "hi"}]
bodies = st.fixed_dictionaries({}, optional={
    "model": st.just(MODEL) | json_values, "messages": st.just(MESSAGES) | json_values,
    "prompt": st.just("hi") | json_values, "max_tokens": json_values, "max_completion_tokens": json_values,
    "n": json_values, "stream": st.booleans() | json_values, "stream_options": json_values,
    "temperature": json_values, "input": json_values,
})
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def assert_openai_error(response: httpx.Response, *, statuses=range(400, 500)) -> dict:
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    return error


def assert_answered_or_refused(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert_openai_error(response)


@HYPOTHESIS
@given(endpoint=st.sampled_from(ENDPOINTS), body=bodies)
def test_json_bodies_of_any_shape(world, endpoint, body):
    with httpx.Client(base_url=world.gateway.url, timeout=TIMEOUT) as client:
        response = client.post(endpoint, json=body, headers={"Authorization": f"Bearer {world.key}"})
        if response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]")
        assert_answered_or_refused(response)


@HYPOTHESIS
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=300)
       | st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_bytes_that_are_not_json(world, endpoint, raw):
    with httpx.Client(base_url=world.gateway.url, timeout=TIMEOUT) as client:
        response = client.post(endpoint, content=raw, headers={"Authorization": f"Bearer {world.key}",
                                                               "Content-Type": "application/json"})
        assert_answered_or_refused(response)


def _sendable(value: bytes) -> bool:
    """What an HTTP client can put in a header: visible bytes and obs-text, inner spaces and tabs."""
    return value == value.strip(b" \t") and all(b >= 0x20 and b != 0x7F or b == 0x09 for b in value)


header_bytes = st.binary(max_size=200) | st.text(max_size=60).map(lambda t: ("Bearer " + t).encode("utf-8"))


@HYPOTHESIS
@given(value=header_bytes.filter(_sendable))
def test_authorization_headers_of_any_bytes(world, value):
    with httpx.Client(base_url=world.gateway.url, timeout=TIMEOUT) as client:
        response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES},
                               headers=[(b"Authorization", value)])
        if response.status_code == 400 and response.text == "Invalid HTTP request received.":
            # uvicorn's HTTP parser refused the bytes before the request reached the gateway
            assert any(b >= 0x80 for b in value), value
            return
        error = assert_openai_error(response, statuses=(401,))
        assert error["code"] == "invalid_api_key"


def test_numbers_out_of_any_range_and_deep_nesting_are_refused(world):
    headers = {"Authorization": f"Bearer {world.key}", "Content-Type": "application/json"}
    cases = [
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 10**30},
        {"model": MODEL, "messages": MESSAGES, "max_tokens": -5},
        {"model": MODEL, "messages": MESSAGES, "n": 10**12},
        {"model": MODEL, "messages": MESSAGES, "n": -1},
        {"model": MODEL, "messages": MESSAGES, "max_tokens": "12"},
        {"model": ["not", "a", "name"], "messages": MESSAGES},
        {"model": MODEL + "\x00", "messages": MESSAGES},
    ]
    with httpx.Client(base_url=world.gateway.url, timeout=TIMEOUT) as client:
        for body in cases:
            assert_openai_error(client.post("/v1/chat/completions", json=body, headers=headers))
        for raw in (b"[" * 100_000, b'{"a":' * 50_000, b'{"model": NaN}', b"\xff\xfe\x00{}"):
            error = assert_openai_error(client.post("/v1/chat/completions", content=raw, headers=headers))
            assert error["code"] == "invalid_json"
    # None of these reached the model or cost anything.
    assert not UsageRecord.objects.filter(member=world.member, status="ok").exists()


def test_a_huge_authorization_header_is_refused_without_a_5xx(world):
    with httpx.Client(base_url=world.gateway.url, timeout=TIMEOUT) as client:
        try:
            response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES},
                                   headers={"Authorization": "Bearer " + "k" * 100_000})
        except httpx.RemoteProtocolError:
            return  # the HTTP server closed the connection before the gateway saw the request: also fine
        assert 400 <= response.status_code < 500
        if response.headers.get("content-type", "").startswith("application/json"):
            assert_openai_error(response)


def test_a_body_over_the_limit_is_413(world):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (3 * 1024 * 1024)}]})
    with httpx.Client(base_url=world.gateway.url, timeout=TIMEOUT) as client:
        response = client.post("/v1/chat/completions", content=body,
                               headers={"Authorization": f"Bearer {world.key}", "Content-Type": "application/json"})
    assert assert_openai_error(response, statuses=(413,))["code"] == "request_too_large"


@pytest.fixture
def impatient_gateway(tmp_path):
    process = GatewayProcess(tmp_path, QWENHUB_BODY_TIMEOUT="1")
    yield process
    process.stop()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_stalled_upload_is_answered_408_in_time(world, impatient_gateway, framing):
    length = b"Content-Length: 500\r\n" if framing == "content-length" else b"Transfer-Encoding: chunked\r\n"
    first = b'{"model": "' if framing == "content-length" else b'b\r\n{"model": "\r\n'
    with socket.create_connection(("127.0.0.1", impatient_gateway.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {world.key}\r\n".encode() + length + b"\r\n" + first)
        started = time.monotonic()
        answer = sock.recv(65536)
        waited = time.monotonic() - started
        while b"request_timeout" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"request_timeout" in body and 0.9 <= waited < 5
