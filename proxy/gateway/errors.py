"""OpenAI-shaped errors for /v1: {"error": {"message", "type", "param", "code"}}.

Texts are module constants so tests can reuse them.
"""
import orjson

INVALID_KEY = "Incorrect API key provided. You can find your API keys in your QwenHub dashboard."
INVALID_JSON = "We could not parse the JSON body of your request. The body must be a JSON object."
BODY_TOO_LARGE = "The request body is larger than the gateway accepts ({limit} bytes)."
MISSING_FIELD = "You must provide a '{field}' parameter."
WRONG_TYPE = "'{field}' must be {kind}."
MODEL_NOT_FOUND = "The model `{model}` does not exist or you do not have access to it."
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


def error_body(message: str, type_: str, *, param: str | None = None, code: str | int | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str, *, param: str | None = None,
                 code: str | int | None = None, headers: list[tuple[bytes, bytes]] | None = None,
                 usage_status: str = "rejected"):
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


def invalid_request(message: str, *, param: str | None = None, code: str | None = None, status: int = 400) -> ApiError:
    return ApiError(status, message, "invalid_request_error", param=param, code=code)
