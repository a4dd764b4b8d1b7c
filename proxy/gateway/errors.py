"""The gateway's error catalogue: every error /v1 answers, in OpenAI's shape {"error": {message, type, param, code}}.

One constructor per kind of error fixes its status, type, code, headers and what the usage row
says about a request that ended with it; code elsewhere raises ``errors.model_not_found(name)``
and never assembles an ``ApiError`` by hand. Texts are module constants so tests can reuse them.
"""
import orjson

from billing.models import UsageRecord

INVALID_KEY = "Incorrect API key provided. You can find your API keys in your QwenHub dashboard."
INVALID_JSON = "We could not parse the JSON body of your request. The body must be a JSON object."
BODY_TOO_LARGE = "The request body is larger than the gateway accepts ({limit} bytes)."
TOO_MANY_BAD_KEYS = "Too many requests with an invalid API key from this address. Try again later."
BODY_TIMEOUT = "The request body did not arrive within {seconds:g} seconds."
MISSING_FIELD = "You must provide a '{field}' parameter."
WRONG_TYPE = "'{field}' must be {kind}."
EMBEDDINGS_NOT_STREAMED = "Embeddings cannot be streamed."
MODEL_NOT_FOUND = "The model `{model}` does not exist or you do not have access to it."
# vLLM's own wording (its 400 for prompt + max_tokens > max_model_len).
MAX_TOKENS_TOO_LARGE = (
    "'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context length is "
    "{max_model_len} tokens and your request has at least 1 input token."
)
NOT_FOUND = "Unknown request URL: {method} {path}. Please check the URL and method."
UPSTREAM_UNAVAILABLE = "The model server for `{model}` is unavailable. Please retry shortly."
UPSTREAM_BUSY = (
    "The model server for `{model}` is busy: your request waited {seconds:.0f} seconds for a free slot. "
    "Please retry later."
)
UPSTREAM_TIMEOUT = "The model server for `{model}` did not answer within {seconds:g} seconds."
UPSTREAM_BAD_RESPONSE = "The model server for `{model}` returned an invalid response ({status})."
UPSTREAM_STREAM_BROKEN = "The model server for `{model}` stopped in the middle of the response."
DATABASE_UNAVAILABLE = "QwenHub cannot reach its database. Please retry shortly."
INTERNAL_ERROR = "QwenHub hit an internal error. The request id is {request_id}."

Status = UsageRecord.Status
Headers = list[tuple[bytes, bytes]]
_NO_RETRY: Headers = [(b"x-should-retry", b"false")]  # the OpenAI SDK does not retry these


def error_body(message: str, type_: str, *, param: str | None = None, code: str | int | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str, *, param: str | None = None,
                 code: str | int | None = None, headers: Headers | None = None,
                 usage_status: str = Status.REJECTED):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or []
        # What the usage row says about a request that ended with this error.
        self.usage_status = usage_status

    def body(self) -> bytes:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class QuotaExceeded(ApiError):
    """The member's (or team's) quota for the period has no room: 429, never retried."""

    def __init__(self, message: str) -> None:
        super().__init__(429, message, "insufficient_quota", code="insufficient_quota", headers=list(_NO_RETRY))


class DatabaseUnavailable(ApiError):
    """PostgreSQL cannot be reached: a 503 the SDK retries (callers catch it by class)."""

    def __init__(self) -> None:
        super().__init__(503, DATABASE_UNAVAILABLE, "service_unavailable", code="database_unavailable")


def retry_after(wait_ms: int) -> Headers:
    """The headers that tell the OpenAI SDK how long to back off, in ms and in whole seconds (rounded up)."""
    return [(b"retry-after-ms", str(wait_ms).encode()), (b"retry-after", str(-(-wait_ms // 1000)).encode())]


# --- the client's mistakes -----------------------------------------------------------------

def invalid_request(message: str, *, param: str | None = None, code: str | None = None, status: int = 400) -> ApiError:
    """The shape shared by the client errors below (prefer them)."""
    return ApiError(status, message, "invalid_request_error", param=param, code=code)


def invalid_key() -> ApiError:
    return invalid_request(INVALID_KEY, code="invalid_api_key", status=401)


def invalid_json() -> ApiError:
    return invalid_request(INVALID_JSON, code="invalid_json")


def missing_field(field: str) -> ApiError:
    return invalid_request(MISSING_FIELD.format(field=field), param=field, code="missing_required_parameter")


def max_tokens_too_large(max_tokens: int, max_model_len: int) -> ApiError:
    """The completion alone could not fit the model's context window: vLLM's 400, before any quota is reserved."""
    return invalid_request(MAX_TOKENS_TOO_LARGE.format(max_tokens=max_tokens, max_model_len=max_model_len),
                           param="max_tokens")


def wrong_type(field: str, kind: str) -> ApiError:
    """`field` is not `kind` ("a string", "a positive integer", ...)."""
    return invalid_request(WRONG_TYPE.format(field=field, kind=kind), param=field)


def too_many_choices(limit: int) -> ApiError:
    return invalid_request(f"'n' must be at most {limit}.", param="n")


def embeddings_not_streamed() -> ApiError:
    return invalid_request(EMBEDDINGS_NOT_STREAMED, param="stream")


def body_too_large(limit: int) -> ApiError:
    return invalid_request(BODY_TOO_LARGE.format(limit=limit), code="request_too_large", status=413)


def body_timeout(seconds: float) -> ApiError:
    return invalid_request(BODY_TIMEOUT.format(seconds=seconds), code="request_timeout", status=408)


def not_found(method: str, path: str) -> ApiError:
    return invalid_request(NOT_FOUND.format(method=method, path=path), code="not_found", status=404)


def model_not_found(model: str) -> ApiError:
    return invalid_request(MODEL_NOT_FOUND.format(model=model), param="model", code="model_not_found", status=404)


# --- the member's limits -------------------------------------------------------------------

def quota_exceeded(message: str) -> QuotaExceeded:
    return QuotaExceeded(message)


def rate_limited(message: str, *, kind: str, wait_ms: int, headers: Headers | tuple = ()) -> ApiError:
    """A rate limit is reached; `kind` ("requests" or "tokens") is OpenAI's error type. The SDK retries after wait_ms."""
    return ApiError(429, message, kind, code="rate_limit_exceeded", headers=[*headers, *retry_after(wait_ms)])


def too_many_bad_keys(wait_ms: int) -> ApiError:
    """Too many invalid keys from one address: refused before any lookup until the window ends."""
    return ApiError(429, TOO_MANY_BAD_KEYS, "invalid_request_error", code="too_many_failed_authentications",
                    headers=retry_after(wait_ms))


def over_rate_limit(message: str, *, headers: Headers | tuple = ()) -> ApiError:
    """The request alone needs more tokens than the per-minute limit: it can never pass, so no retry."""
    return ApiError(429, message, "tokens", code="rate_limit_exceeded", headers=[*headers, *_NO_RETRY])


# --- the upstream's failures ---------------------------------------------------------------

def upstream_busy(model: str, *, waited: float, retry_in: float) -> ApiError:
    """No upstream slot freed up within the fair queue's timeout (its QueueTimeout)."""
    wait_ms = max(100, round(retry_in * 1000))
    return rate_limited(UPSTREAM_BUSY.format(model=model, seconds=waited), kind="requests", wait_ms=wait_ms)


def upstream_timeout(model: str, seconds: float) -> ApiError:
    return ApiError(504, UPSTREAM_TIMEOUT.format(model=model, seconds=seconds), "timeout", code="upstream_timeout",
                    usage_status=Status.UPSTREAM_TIMEOUT)


def upstream_unavailable(model: str) -> ApiError:
    return ApiError(503, UPSTREAM_UNAVAILABLE.format(model=model), "service_unavailable",
                    code="upstream_unavailable", usage_status=Status.UPSTREAM_UNAVAILABLE)


def upstream_bad_response(model: str, status: int) -> ApiError:
    """The upstream answered something unusable: the server's problem (502), not the client's."""
    return ApiError(502, UPSTREAM_BAD_RESPONSE.format(model=model, status=status), "upstream_error",
                    code="bad_gateway", usage_status=Status.UPSTREAM_ERROR)


def upstream_client_error(status: int, message: str, type_: str = "invalid_request_error", *,
                          param: str | None = None, code: str | int | None = None) -> ApiError:
    """vLLM refused the request itself (a 4xx): passed on as vLLM said it, recorded as the client's error."""
    return ApiError(status, message, type_, param=param, code=code, usage_status=Status.CLIENT_ERROR)


def from_upstream(model: str, status: int, data) -> ApiError:
    """The error for an upstream answer with a non-200 status and `data`, its decoded JSON body (or None)."""
    if 400 <= status < 500 and status not in (401, 403):
        err = data.get("error", data) if isinstance(data, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return upstream_client_error(status, err["message"], str(err.get("type") or "invalid_request_error"),
                                         param=err.get("param"), code=err.get("code"))
        return upstream_client_error(status, UPSTREAM_BAD_RESPONSE.format(model=model, status=status))
    if status == 503:
        return upstream_unavailable(model)
    # 401/403 (the gateway's upstream key is wrong) and 5xx are the server's problem, not the client's.
    return upstream_bad_response(model, status)


def stream_broken_event(model: str) -> bytes:
    """The SSE event that ends a stream the upstream broke off (the status line is long gone)."""
    return b"data: " + error_body(UPSTREAM_STREAM_BROKEN.format(model=model), "upstream_error", code=502) + b"\n\n"


# --- the gateway's own failures ------------------------------------------------------------

def database_unavailable() -> DatabaseUnavailable:
    return DatabaseUnavailable()


def internal_error(request_id: str) -> ApiError:
    return ApiError(500, INTERNAL_ERROR.format(request_id=request_id), "server_error")
