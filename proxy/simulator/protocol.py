"""Request validation and the JSON shapes of vLLM's OpenAI-compatible responses."""
from __future__ import annotations

import base64
import math
import os
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import orjson

from .tokens import (
    apply_stop,
    chat_prompt_tokens,
    completion_prompt_token_counts,
    count_text_tokens,
    generate_pieces,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error answered as vLLM's error body with an HTTP status."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param

    def body(self, flat: bool = False) -> bytes:
        info = {"message": self.message, "type": self.err_type, "param": self.param, "code": self.status}
        return orjson.dumps({"object": "error", **info} if flat else {"error": info})


def validation_error(message: str, loc: str, err_type: str = "value_error", param: str | None = None) -> ApiError:
    """A request-body validation error: FastAPI's 422 that vLLM turns into 400 "Bad Request"."""
    detail = f"[{{'type': '{err_type}', 'loc': ('body', '{loc}'), 'msg': {message!r}}}]"
    return ApiError(400, detail, "Bad Request", param)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


def unsupported_api(api: str) -> ApiError:
    """What vLLM answers for an endpoint the served model's runner lacks (embeddings of a generative model)."""
    return ApiError(400, f"The model does not support {api} API", "BadRequestError")


def model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist.", "NotFoundError", "model")


def parse_json(raw: bytes, content_type: str) -> dict[str, Any]:
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise ApiError(400, "Unsupported Media Type: Only 'application/json' is allowed", "Bad Request")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"[{{'type': 'json_invalid', 'loc': ('body', 0), 'msg': 'JSON decode error', "
                            f"'ctx': {{'error': {str(exc)!r}}}}}]", "Bad Request") from None
    if not isinstance(body, dict):
        raise validation_error("Input should be a valid dictionary or object", "", "model_type")
    return body


def _int(body: dict, key: str, minimum: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise validation_error("Input should be a valid integer", key, "int_type")
    if minimum is not None and v < minimum:
        raise bad_request(f"{key} must be at least {minimum}, got {v}.", key)
    return v


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise validation_error("Input should be a valid boolean", key, "bool_type")
    return v


def _is_token_list(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


@dataclass(slots=True)
class Choice:
    index: int
    prompt_tokens: int
    pieces: list[str]
    finish_reason: str
    stop_reason: str | None

    @property
    def length(self) -> int:
        return len(self.pieces)


@dataclass(slots=True)
class GenJob:
    model: str
    prompt_tokens: int
    choices: list[Choice]
    stream: bool
    include_usage: bool
    continuous_usage: bool

    @property
    def completion_tokens(self) -> int:
        return sum(c.length for c in self.choices)


def _stream_flags(body: dict, force_usage: bool) -> tuple[bool, bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise validation_error("Input should be a valid dictionary", "stream_options", "dict_type")
        if not stream:
            raise validation_error("Value error, Stream options can only be defined when `stream=True`.",
                                   "stream_options", param="stream_options")
        include = _bool(opts, "include_usage", True)  # pydantic default: {} means True
        continuous = include and _bool(opts, "continuous_usage_stats", False)
    else:
        include = continuous = False
    if force_usage and stream:
        include = continuous = True
    return stream, include, continuous


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise validation_error("Input should be a valid string or list of strings", "stop", "string_type")


def plan_choices(
    body: dict, prompt_counts: list[int], *, max_model_len: int, response_tokens: int, chat: bool
) -> list[Choice]:
    """Check the context length and decide, per choice, the tokens and the finish reason."""
    n = _int(body, "n", 1) or 1
    if chat:
        max_tokens = _int(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", 1)
        else:
            _int(body, "max_tokens", 1)
    else:
        max_tokens = _int(body, "max_tokens", 1)
    min_tokens = _int(body, "min_tokens", 0) or 0
    ignore_eos = _bool(body, "ignore_eos")
    include_stop = _bool(body, "include_stop_str_in_output")
    stops = _stops(body)
    if (body.get("top_logprobs") is not None and chat and not body.get("logprobs")):
        raise validation_error("Value error, when using `top_logprobs`, `logprobs` must be set to true.",
                               "top_logprobs", param="top_logprobs")
    choices: list[Choice] = []
    for p_index, prompt in enumerate(prompt_counts):
        if prompt >= max_model_len:
            raise bad_request(
                f"This model's maximum context length is {max_model_len} tokens. However, your request has "
                f"{prompt} input tokens. Please reduce the length of the input messages.", "input_tokens")
        if max_tokens is not None and prompt + max_tokens > max_model_len:
            raise bad_request(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
                f"context length is {max_model_len} tokens and your request has {prompt} input tokens "
                f"({max_tokens} > {max_model_len} - {prompt}).", "max_tokens")
        room = max_model_len - prompt
        limit = max_tokens if max_tokens is not None else (
            room if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room))
        natural = max(response_tokens, min_tokens)
        if ignore_eos or limit < natural:
            length, reason = limit, "length"
        else:
            length, reason = natural, "stop"
        for j in range(n):
            index = p_index * n + j
            pieces = generate_pieces(length, index)
            stop_reason = None
            if stops:
                pieces, stop_reason = apply_stop(pieces, stops, include_stop)
            choices.append(Choice(index, prompt, pieces, reason if stop_reason is None else "stop", stop_reason))
    return choices


def resolve_model(body: dict, names: dict[str, str], default: str) -> str:
    model = body.get("model")
    if model is None:
        return default
    if not isinstance(model, str):
        raise validation_error("Input should be a valid string", "model", "string_type")
    resolved = names.get(model)
    if resolved is None:
        raise model_not_found(model)
    return resolved


def chat_job(body: dict, *, resolve: Callable[[dict], str], max_model_len: int, response_tokens: int, force_usage: bool) -> GenJob:
    messages = body.get("messages")
    if messages is None:
        raise validation_error("Field required", "messages", "missing")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise validation_error("Input should be a non-empty list of messages with a role", "messages", "list_type")
    for m in messages:
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise validation_error("Input should be a valid string or list of content parts",
                                   "messages", "string_type")
    stream, include, continuous = _stream_flags(body, force_usage)
    model = resolve(body)
    prompt = chat_prompt_tokens(messages)
    choices = plan_choices(body, [prompt], max_model_len=max_model_len, response_tokens=response_tokens, chat=True)
    return GenJob(model, prompt, choices, stream, include, continuous)


def completion_job(body: dict, *, resolve: Callable[[dict], str], max_model_len: int, response_tokens: int,
                   force_usage: bool) -> GenJob:
    prompt = body.get("prompt")
    if prompt is None:
        raise validation_error("Field required", "prompt", "missing")
    ok = isinstance(prompt, str) or _is_token_list(prompt) or (
        isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_list(p) for p in prompt))
    if not ok:
        raise validation_error("Input should be a string, a list of strings or a list of token ids",
                               "prompt", "string_type")
    stream, include, continuous = _stream_flags(body, force_usage)
    model = resolve(body)
    counts = completion_prompt_token_counts(prompt)
    choices = plan_choices(body, counts, max_model_len=max_model_len, response_tokens=response_tokens, chat=False)
    return GenJob(model, sum(counts), choices, stream, include, continuous)


def new_id(prefix: str, request_id: str | None) -> str:
    return prefix + (request_id or os.urandom(16).hex())


def usage(prompt: int, completion: int, details: bool = True) -> dict[str, Any]:
    u = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
    if details:
        u["prompt_tokens_details"] = None
    return u


def chat_response(job: GenJob, rid: str, created: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": job.model,
        "choices": [{
            "index": c.index,
            "message": {"role": "assistant", "content": "".join(c.pieces), "refusal": None, "annotations": None,
                        "audio": None, "function_call": None, "tool_calls": [], "reasoning": None},
            "logprobs": None, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, "token_ids": None,
        } for c in job.choices],
        "service_tier": None, "system_fingerprint": None,
        "usage": usage(job.prompt_tokens, job.completion_tokens),
        "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None,
    }


def completion_response(job: GenJob, rid: str, created: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": job.model,
        "choices": [{
            "index": c.index, "text": "".join(c.pieces), "logprobs": None, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason, "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None,
        } for c in job.choices],
        "service_tier": None, "system_fingerprint": None,
        "usage": usage(job.prompt_tokens, job.completion_tokens), "kv_transfer_params": None,
    }


class ChunkWriter:
    """Builds the SSE events of one streamed chat or completions response."""

    __slots__ = ("job", "chat", "prefix", "head")

    def __init__(self, job: GenJob, rid: str, created: int, chat: bool) -> None:
        self.job, self.chat = job, chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.head = orjson.dumps({"id": rid, "object": obj, "created": created, "model": job.model})[:-1]
        self.prefix = b"data: " + self.head + b',"choices":['

    def step(self, prev: int, pos: int) -> bytes:
        """Events for tokens [prev, pos) of every unfinished choice."""
        out: list[bytes] = []
        job = self.job
        for c in job.choices:
            length = len(c.pieces)
            if length <= prev:
                continue
            end = min(pos, length)
            text = "".join(c.pieces[prev:end])
            final = end >= length
            if self.chat:
                if prev == 0:
                    role = {"index": c.index, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None}
                    out.append(self._event(role, c, 0))
                ch: dict[str, Any] = {"index": c.index, "delta": {"content": text}, "logprobs": None,
                                      "finish_reason": c.finish_reason if final else None}
                if final:
                    ch["stop_reason"] = c.stop_reason
            else:
                ch = {"index": c.index, "text": text, "logprobs": None,
                      "finish_reason": c.finish_reason if final else None,
                      "stop_reason": c.stop_reason if final else None}
            out.append(self._event(ch, c, end))
        return b"".join(out)

    def _event(self, choice: dict, c: Choice, done: int) -> bytes:
        body = self.prefix + orjson.dumps(choice) + b"]"
        if self.job.continuous_usage:
            body += b',"usage":' + orjson.dumps(usage(c.prompt_tokens, done, details=not self.chat))
        elif not self.chat:
            body += b',"usage":null'
        return body + b"}\n\n"

    def usage_event(self) -> bytes:
        u = usage(self.job.prompt_tokens, self.job.completion_tokens, details=False)
        return b"data: " + self.head + b',"choices":[],"usage":' + orjson.dumps(u) + b"}\n\n"


DONE = b"data: [DONE]\n\n"
ERROR_EVENT = (b'data: {"error":{"message":"Simulated engine failure (fault error_chunk)",'
               b'"type":"InternalServerError","param":null,"code":500}}\n\n')
GARBAGE_EVENT = b"data: this is not JSON {\n\n"
GARBAGE_BODY = b"<html>this is not JSON {"
# What a reverse proxy in front of a dead vLLM answers (nginx's page).
HTML_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
            b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
HUGE_LINE_BYTES = 10 * 1024 * 1024  # the huge_line fault's line: 10 MB without a newline


# --- embeddings ------------------------------------------------------------------------

class Embedder:
    """Deterministic unit vectors: a fixed base vector rotated by a hash of the input."""

    def __init__(self, dim: int) -> None:
        raw = [math.sin(0.37 * j + 1.0) + 0.1 * math.cos(1.3 * j) for j in range(dim)]
        norm = math.sqrt(sum(x * x for x in raw)) or 1.0
        self.dim = dim
        self.base = [x / norm for x in raw]
        self.base_bytes = struct.pack(f"<{dim}f", *self.base)

    def vector(self, key: bytes, dims: int | None, b64: bool) -> Any:
        shift = zlib.crc32(key) % self.dim
        if dims is None or dims >= self.dim:
            if b64:
                cut = shift * 4
                return base64.b64encode(self.base_bytes[cut:] + self.base_bytes[:cut]).decode()
            return self.base[shift:] + self.base[:shift]
        vec = (self.base[shift:] + self.base[:shift])[:dims]
        norm = math.sqrt(sum(x * x for x in vec)) or 1.0
        vec = [x / norm for x in vec]
        return base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if b64 else vec


def embedding_inputs(body: dict) -> list[tuple[bytes, int]]:
    """(hash key, token count) for each input of an embeddings request."""
    inp = body.get("input")
    if inp is None:
        raise validation_error("Field required", "input", "missing")
    if isinstance(inp, str):
        return [(inp.encode(), count_text_tokens(inp))]
    if _is_token_list(inp):
        return [(orjson.dumps(inp), len(inp))]
    if isinstance(inp, list) and inp:
        out = []
        for x in inp:
            if isinstance(x, str):
                out.append((x.encode(), count_text_tokens(x)))
            elif _is_token_list(x):
                out.append((orjson.dumps(x), len(x)))
            else:
                break
        else:
            return out
    raise validation_error("Input should be a string, a list of strings or a list of token ids",
                           "input", "string_type")


def embedding_response(embedder: Embedder, body: dict, items: list[tuple[bytes, int]], model: str,
                       rid: str) -> dict[str, Any]:
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise validation_error("Input should be 'float' or 'base64'", "encoding_format", "literal_error")
    dims = _int(body, "dimensions", 1)
    b64 = fmt == "base64"
    prompt = sum(n for _, n in items)
    return {
        "id": rid, "object": "list", "created": int(time.time()), "model": model,
        "data": [{"index": i, "object": "embedding", "embedding": embedder.vector(key, dims, b64)}
                 for i, (key, _) in enumerate(items)],
        "usage": usage(prompt, 0),
    }
