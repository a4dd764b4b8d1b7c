"""The error catalogue: each kind of error has one status, type, code, set of headers and usage-row status."""
import orjson
import pytest

from billing.models import UsageRecord
from proxy.gateway import errors
from proxy.gateway.errors import ApiError, DatabaseUnavailable, QuotaExceeded

S = UsageRecord.Status


def shape(exc: ApiError) -> tuple:
    return exc.status, exc.type, exc.code, exc.param, exc.usage_status


@pytest.mark.parametrize(("exc", "expected", "message"), [
    (errors.invalid_key(), (401, "invalid_request_error", "invalid_api_key", None, S.REJECTED), errors.INVALID_KEY),
    (errors.invalid_json(), (400, "invalid_request_error", "invalid_json", None, S.REJECTED), errors.INVALID_JSON),
    (errors.missing_field("messages"),
     (400, "invalid_request_error", "missing_required_parameter", "messages", S.REJECTED),
     "You must provide a 'messages' parameter."),
    (errors.wrong_type("n", "a positive integer"), (400, "invalid_request_error", None, "n", S.REJECTED),
     "'n' must be a positive integer."),
    (errors.too_many_choices(128), (400, "invalid_request_error", None, "n", S.REJECTED), "'n' must be at most 128."),
    (errors.embeddings_not_streamed(), (400, "invalid_request_error", None, "stream", S.REJECTED),
     errors.EMBEDDINGS_NOT_STREAMED),
    (errors.body_too_large(1024), (413, "invalid_request_error", "request_too_large", None, S.REJECTED),
     "The request body is larger than the gateway accepts (1024 bytes)."),
    (errors.body_timeout(30.0), (408, "invalid_request_error", "request_timeout", None, S.REJECTED),
     "The request body did not arrive within 30 seconds."),
    (errors.not_found("GET", "/v1/nothing"), (404, "invalid_request_error", "not_found", None, S.REJECTED),
     errors.NOT_FOUND.format(method="GET", path="/v1/nothing")),
    (errors.model_not_found("qwen-x"), (404, "invalid_request_error", "model_not_found", "model", S.REJECTED),
     errors.MODEL_NOT_FOUND.format(model="qwen-x")),
    (errors.upstream_timeout("qwen", 30.0), (504, "timeout", "upstream_timeout", None, S.UPSTREAM_TIMEOUT),
     "The model server for `qwen` did not answer within 30 seconds."),
    (errors.upstream_unavailable("qwen"),
     (503, "service_unavailable", "upstream_unavailable", None, S.UPSTREAM_UNAVAILABLE),
     errors.UPSTREAM_UNAVAILABLE.format(model="qwen")),
    (errors.upstream_bad_response("qwen", 200), (502, "upstream_error", "bad_gateway", None, S.UPSTREAM_ERROR),
     "The model server for `qwen` returned an invalid response (200)."),
    (errors.database_unavailable(), (503, "service_unavailable", "database_unavailable", None, S.REJECTED),
     errors.DATABASE_UNAVAILABLE),
    (errors.internal_error("req_1"), (500, "server_error", None, None, S.REJECTED),
     "QwenHub hit an internal error. The request id is req_1."),
])
def test_each_kind_has_its_status_type_code_and_usage_status(exc, expected, message):
    assert shape(exc) == expected
    assert exc.message == message and exc.headers == []


def test_body_is_openais_shape():
    body = orjson.loads(errors.model_not_found("m").body())
    assert body == {"error": {"message": errors.MODEL_NOT_FOUND.format(model="m"), "type": "invalid_request_error",
                              "param": "model", "code": "model_not_found"}}


def test_quota_exceeded_is_never_retried():
    exc = errors.quota_exceeded("You have used 50 requests.")
    assert isinstance(exc, QuotaExceeded)
    assert shape(exc) == (429, "insufficient_quota", "insufficient_quota", None, S.REJECTED)
    assert exc.headers == [(b"x-should-retry", b"false")]


def test_database_unavailable_is_caught_by_class():
    assert isinstance(errors.database_unavailable(), DatabaseUnavailable)


def test_rate_limited_keeps_the_limit_headers_and_says_when_to_retry():
    limit = [(b"x-ratelimit-limit-requests", b"3")]
    exc = errors.rate_limited("slow down", kind="requests", wait_ms=12_345, headers=limit)
    assert shape(exc) == (429, "requests", "rate_limit_exceeded", None, S.REJECTED)
    assert exc.headers == limit + [(b"retry-after-ms", b"12345"), (b"retry-after", b"13")]
    assert errors.rate_limited("m", kind="tokens", wait_ms=2000).headers == [
        (b"retry-after-ms", b"2000"), (b"retry-after", b"2")]


def test_a_request_over_the_token_rate_is_never_retried():
    exc = errors.over_rate_limit("too big", headers=[(b"x-ratelimit-limit-tokens", b"1000")])
    assert shape(exc) == (429, "tokens", "rate_limit_exceeded", None, S.REJECTED)
    assert exc.headers == [(b"x-ratelimit-limit-tokens", b"1000"), (b"x-should-retry", b"false")]


def test_upstream_busy_waits_at_least_100_ms():
    exc = errors.upstream_busy("qwen", waited=30.2, retry_in=0.01)
    assert shape(exc) == (429, "requests", "rate_limit_exceeded", None, S.REJECTED)
    assert exc.message == errors.UPSTREAM_BUSY.format(model="qwen", seconds=30.2)
    assert exc.headers == [(b"retry-after-ms", b"100"), (b"retry-after", b"1")]
    assert errors.upstream_busy("qwen", waited=1, retry_in=2.5).headers[0] == (b"retry-after-ms", b"2500")


def test_upstream_client_errors_pass_through_as_vllm_said():
    data = {"error": {"message": "max_tokens is too large", "type": "BadRequestError", "param": "max_tokens",
                      "code": 400}}
    exc = errors.from_upstream("qwen", 400, data)
    assert shape(exc) == (400, "BadRequestError", 400, "max_tokens", S.CLIENT_ERROR)
    assert exc.message == "max_tokens is too large"
    bare = errors.from_upstream("qwen", 422, {"message": "bad", "type": None})  # vLLM's unwrapped shape
    assert shape(bare) == (422, "invalid_request_error", None, None, S.CLIENT_ERROR) and bare.message == "bad"
    unreadable = errors.from_upstream("qwen", 404, None)
    assert shape(unreadable) == (404, "invalid_request_error", None, None, S.CLIENT_ERROR)
    assert unreadable.message == errors.UPSTREAM_BAD_RESPONSE.format(model="qwen", status=404)


@pytest.mark.parametrize(("status", "expected"), [
    (401, (502, "upstream_error", "bad_gateway", None, S.UPSTREAM_ERROR)),  # the gateway's upstream key
    (403, (502, "upstream_error", "bad_gateway", None, S.UPSTREAM_ERROR)),
    (500, (502, "upstream_error", "bad_gateway", None, S.UPSTREAM_ERROR)),
    (503, (503, "service_unavailable", "upstream_unavailable", None, S.UPSTREAM_UNAVAILABLE)),
])
def test_upstream_server_errors_are_the_gateways(status, expected):
    assert shape(errors.from_upstream("qwen", status, {"error": {"message": "secret detail"}})) == expected


def test_stream_broken_event_is_an_sse_error():
    event = errors.stream_broken_event("qwen")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[6:]) == {"error": {"message": errors.UPSTREAM_STREAM_BROKEN.format(model="qwen"),
                                                 "type": "upstream_error", "param": None, "code": 502}}


def test_too_many_bad_keys_says_when_to_come_back():
    exc = errors.too_many_bad_keys(1500)
    assert shape(exc) == (429, "invalid_request_error", "too_many_failed_authentications", None, S.REJECTED)
    assert exc.message == errors.TOO_MANY_BAD_KEYS
    assert dict(exc.headers) == {b"retry-after-ms": b"1500", b"retry-after": b"2"}
