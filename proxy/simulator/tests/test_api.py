"""Wire format of the simulator, parsed by the real OpenAI SDK (sync and async) and raw httpx."""
import asyncio
import base64
import json
import struct

import httpx
import openai
import pytest

from proxy.simulator.testing import start_simulator
from proxy.simulator.tokens import chat_prompt_tokens, completion_prompt_tokens, count_text_tokens

SERVED = "qwen"
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, world!"}]
PROMPT_TOKENS = chat_prompt_tokens(MSGS)  # (4+4) + (4+4) + 2 = 18


@pytest.fixture(scope="module")
def sim():
    with start_simulator("--model", "Qwen/Qwen2.5-7B-Instruct", "--served-model-name", SERVED, "qwen-alias",
                         "--lora-modules", "sql-lora=/loras/sql",
                         '{"name": "other-lora", "path": "/loras/other", "base_model_name": "qwen-alias"}',
                         "--max-model-len", "512") as handle:
        yield handle


@pytest.fixture(scope="module")
def embed_sim():
    """A model served for embedding (vLLM's pooling runner): the only kind that answers /v1/embeddings."""
    with start_simulator("--model", "BAAI/bge-m3", "--served-model-name", SERVED, "--runner", "pooling") as handle:
        yield handle


@pytest.fixture()
def client(sim):
    with openai.OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0) as c:
        yield c


def sse_events(raw: bytes) -> list[str]:
    text = raw.decode()
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    for e in events:
        assert e.startswith("data: ") and "\n" not in e, e
    return [e[len("data: "):] for e in events]


def raw_stream(sim, path, body, headers=None):
    r = httpx.post(sim.base_url + path, json=body, headers=headers, timeout=10)
    return r, sse_events(r.content)


# --- non-streaming ---------------------------------------------------------------------

def test_chat_completion_shape_and_usage(client):
    resp = client.chat.completions.create(model=SERVED, messages=MSGS)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.model == SERVED and isinstance(resp.created, int)
    (choice,) = resp.choices
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] is None
    assert choice.message.role == "assistant"
    assert resp.usage.prompt_tokens == PROMPT_TOKENS == 18
    assert resp.usage.completion_tokens == 16 == count_text_tokens(choice.message.content)
    assert resp.usage.total_tokens == 34


def test_raw_json_key_order_and_nulls(sim):
    r = httpx.post(sim.base_url + "/chat/completions", json={"messages": MSGS, "max_tokens": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                          "usage", "prompt_logprobs", "prompt_token_ids", "kv_transfer_params"]
    assert list(body["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"]
    assert body["model"] == SERVED  # model omitted -> the first served name
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["stop_reason"] is None


def test_alias_lora_and_unknown_fields(client):
    resp = client.chat.completions.create(model="qwen-alias", messages=MSGS, max_tokens=3,
                                          extra_body={"top_k": 5, "whatever_new_field": {"x": 1}}, user="u1")
    assert resp.model == SERVED and resp.usage.completion_tokens == 3
    assert client.chat.completions.create(model="sql-lora", messages=MSGS, max_tokens=1).model == "sql-lora"


def test_n_choices_sum_completion_tokens(client):
    resp = client.chat.completions.create(model=SERVED, messages=MSGS, n=3, max_tokens=5)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 3
    assert resp.usage.completion_tokens == 15 and resp.usage.prompt_tokens == PROMPT_TOKENS
    assert all(c.finish_reason == "length" for c in resp.choices)


def test_max_completion_tokens_wins_over_max_tokens(client):
    resp = client.chat.completions.create(model=SERVED, messages=MSGS, max_tokens=9, max_completion_tokens=4)
    assert resp.usage.completion_tokens == 4 and resp.choices[0].finish_reason == "length"


def test_ignore_eos_generates_exactly_max_tokens(client):
    resp = client.chat.completions.create(model=SERVED, messages=MSGS, max_tokens=40,
                                          extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 40 == count_text_tokens(resp.choices[0].message.content)
    assert resp.choices[0].finish_reason == "length"
    natural = client.chat.completions.create(model=SERVED, messages=MSGS, max_tokens=40)
    assert natural.usage.completion_tokens == 16 and natural.choices[0].finish_reason == "stop"


def test_stop_string(client):
    resp = client.chat.completions.create(model=SERVED, messages=MSGS, stop=["zzz", " simulated"])
    choice = resp.choices[0]
    assert choice.message.content == "Sure, here is a"
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == " simulated"
    assert resp.usage.completion_tokens == 6


def test_completions_str_ids_and_list(client):
    resp = client.completions.create(model=SERVED, prompt="Say: one, two")
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.usage.prompt_tokens == completion_prompt_tokens("Say: one, two") == 5
    assert resp.usage.completion_tokens == 16 and resp.choices[0].finish_reason == "stop"  # default max 16
    resp = client.completions.create(model=SERVED, prompt=[1, 2, 3], max_tokens=4)
    assert resp.usage.prompt_tokens == 3 and resp.usage.completion_tokens == 4
    resp = client.completions.create(model=SERVED, prompt=["a b", "c"], max_tokens=2, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.usage.prompt_tokens == 3 and resp.usage.completion_tokens == 8


def test_a_generative_model_refuses_embeddings_and_a_pooling_model_generation(client, sim, embed_sim):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=SERVED, input="Hello")
    assert refused.value.body["message"] == "The model does not support Embeddings API"
    assert refused.value.body["type"] == "BadRequestError"
    for path, api in (("/chat/completions", "Chat Completions"), ("/completions", "Completions")):
        r = httpx.post(embed_sim.base_url + path, json={"messages": MSGS, "prompt": "hi"})
        assert r.status_code == 400 and r.json()["error"]["message"] == f"The model does not support {api} API"
    auto = __import__("proxy.simulator.config", fromlist=["parse_args"]).parse_args
    assert auto(["--model", "Qwen/Qwen3-Embedding-0.6B"]).pooling and not auto(["--model", "Qwen/Qwen2.5-7B"]).pooling
    assert not auto(["--model", "BAAI/bge-m3", "--runner", "generate"]).pooling


def test_embeddings_base64_default_and_float(embed_sim):
    sim = embed_sim
    client = openai.OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0)
    resp = client.embeddings.create(model=SERVED, input=["Hello, world!", "other text"])  # SDK sends base64
    assert resp.model == SERVED and len(resp.data) == 2
    assert resp.usage.prompt_tokens == 4 + 2 and resp.usage.total_tokens == 6
    v0 = resp.data[0].embedding
    assert len(v0) == 1024 and abs(sum(x * x for x in v0) - 1.0) < 1e-4
    assert v0 != resp.data[1].embedding
    raw = httpx.post(sim.base_url + "/embeddings", json={"input": "Hello, world!", "encoding_format": "base64"}).json()
    assert raw["id"].startswith("embd-") and raw["object"] == "list"
    assert raw["usage"] == {"prompt_tokens": 4, "total_tokens": 4, "completion_tokens": 0,
                            "prompt_tokens_details": None}
    decoded = struct.unpack("<1024f", base64.b64decode(raw["data"][0]["embedding"]))
    floats = httpx.post(sim.base_url + "/embeddings", json={"input": "Hello, world!", "encoding_format": "float"}
                        ).json()["data"][0]["embedding"]
    assert decoded == pytest.approx(floats, abs=1e-7) and decoded == pytest.approx(v0, abs=1e-7)


def test_async_client_chat_completions_and_stream(sim):
    async def go():
        async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as ac:
            r1, r2 = await asyncio.gather(
                ac.chat.completions.create(model=SERVED, messages=MSGS, n=2, max_tokens=3),
                ac.completions.create(model=SERVED, prompt="hi", max_tokens=2))
            stream = await ac.chat.completions.create(model=SERVED, messages=MSGS, stream=True,
                                                      stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            return r1, r2, chunks

    r1, r2, chunks = asyncio.run(go())
    assert r1.usage.completion_tokens == 6 and len(r1.choices) == 2
    assert r2.usage.completion_tokens == 2
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]).startswith("Sure, here")


# --- streaming ---------------------------------------------------------------------------

def test_chat_stream_framing_without_usage(sim):
    r, events = raw_stream(sim, "/chat/completions", {"messages": MSGS, "stream": True, "max_tokens": 3})
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({(c["id"], c["created"]) for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    for e in events[:-1]:
        assert e == json.dumps(json.loads(e), separators=(",", ":"), ensure_ascii=False)  # compact JSON
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]
    assert all("usage" not in c for c in chunks)
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:]] == ["Sure", ",", " here"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["stop_reason"] is None
    assert "stop_reason" not in chunks[1]["choices"][0]


@pytest.mark.parametrize("options", [{"include_usage": True}, {}])  # {} means include_usage (pydantic quirk)
def test_chat_stream_final_usage_chunk(sim, options):
    _, events = raw_stream(sim, "/chat/completions", {"messages": MSGS, "stream": True, "n": 2, "max_tokens": 4,
                                                      "stream_options": options})
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == []
    assert list(last["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens"]
    assert last["usage"] == {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS + 8, "completion_tokens": 8}
    assert all("usage" not in json.loads(e) for e in events[:-2])


def test_chat_stream_continuous_usage(sim):
    _, events = raw_stream(sim, "/chat/completions", {
        "messages": MSGS, "stream": True, "max_tokens": 3,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3]
    assert all(c["usage"]["prompt_tokens"] == PROMPT_TOKENS for c in chunks)
    assert chunks[-1]["choices"] == []
    # continuous_usage_stats without include_usage gives nothing
    _, events = raw_stream(sim, "/chat/completions", {"messages": MSGS, "stream": True, "max_tokens": 2,
                                                      "stream_options": {"include_usage": False,
                                                                         "continuous_usage_stats": True}})
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_sdk_streams_parse_and_count(client):
    stream = client.chat.completions.create(model=SERVED, messages=MSGS, stream=True, n=2,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True})
    texts = {0: "", 1: ""}
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
        if not chunk.choices:
            usage = chunk.usage
    assert usage.completion_tokens == 32 == sum(count_text_tokens(t) for t in texts.values())
    stream = client.chat.completions.create(model=SERVED, messages=MSGS, stream=True)
    chunks = list(stream)
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "stop"


def test_completions_stream_has_usage_null_and_no_role_chunk(sim, client):
    _, events = raw_stream(sim, "/completions", {"prompt": "hi", "stream": True, "max_tokens": 2})
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0] == {"id": chunks[0]["id"], "object": "text_completion", "created": chunks[0]["created"],
                         "model": SERVED, "choices": [{"index": 0, "text": "Sure", "logprobs": None,
                                                       "finish_reason": None, "stop_reason": None}],
                         "usage": None}
    assert chunks[1]["choices"][0]["finish_reason"] == "length"
    _, events = raw_stream(sim, "/completions", {"prompt": "hi", "stream": True, "max_tokens": 2,
                                                 "stream_options": {"include_usage": True}})
    last = json.loads(events[-2])
    assert list(last) == ["id", "object", "created", "model", "choices", "usage"]
    assert last["object"] == "text_completion" and last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 1, "total_tokens": 3, "completion_tokens": 2}
    stream = client.completions.create(model=SERVED, prompt="hi", stream=True, stream_options={"include_usage": True})
    parts = list(stream)
    assert parts[-1].usage.completion_tokens == 16
    assert count_text_tokens("".join(p.choices[0].text for p in parts[:-1])) == 16


def test_tokens_per_chunk_groups_tokens():
    with start_simulator("--tokens-per-chunk", "4") as s:
        _, events = raw_stream(s, "/chat/completions", {"messages": MSGS, "stream": True, "max_tokens": 10})
        contents = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[1:-1]]
        assert [count_text_tokens(c) for c in contents] == [1, 4, 4, 1]


def test_force_include_usage():
    with start_simulator("--enable-force-include-usage") as s:
        _, events = raw_stream(s, "/chat/completions", {"messages": MSGS, "stream": True, "max_tokens": 2})
        chunks = [json.loads(e) for e in events[:-1]]
        assert all("usage" in c for c in chunks) and chunks[-1]["choices"] == []
        # non-streamed requests are unaffected
        assert "usage" in httpx.post(s.base_url + "/chat/completions", json={"messages": MSGS}).json()


# --- errors -------------------------------------------------------------------------------

def test_unknown_model_is_404(client, sim):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=MSGS)
    assert str(info.value.code) == "404" and info.value.param == "model" and info.value.type == "NotFoundError"
    body = httpx.post(sim.base_url + "/completions", json={"model": "nope", "prompt": "x"}).json()
    assert body == {"error": {"message": "The model `nope` does not exist.", "type": "NotFoundError",
                              "param": "model", "code": 404}}


@pytest.mark.parametrize("content, kwargs", [
    (b'{"messages": [', {"headers": {"content-type": "application/json"}}),
    (b'[1, 2]', {"headers": {"content-type": "application/json"}}),
    (b'{"messages": []}', {"headers": {"content-type": "application/json"}}),
    (b'{"model": "qwen"}', {"headers": {"content-type": "application/json"}}),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
     {"headers": {"content-type": "application/json"}}),
    (b'{"messages": [{"role": "user", "content": "x"}]}', {"headers": {"content-type": "text/plain"}}),
])
def test_bad_requests_are_400_not_422(sim, content, kwargs):
    r = httpx.post(sim.base_url + "/chat/completions", content=content, **kwargs)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == 400 and isinstance(err["message"], str) and err["type"] in ("Bad Request", "BadRequestError")


def test_stream_options_without_stream_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED, messages=MSGS, stream_options={"include_usage": True})
    assert "Stream options can only be defined when" in info.value.message
    assert info.value.param == "stream_options"


def test_context_length_errors(client, sim):
    long_text = "word " * 600
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": long_text}])
    assert "maximum context length is 512 tokens" in info.value.message and info.value.param == "input_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED, messages=MSGS, max_tokens=500)  # 18 + 500 > 512
    assert "'max_tokens' or 'max_completion_tokens' is too large: 500" in info.value.message
    assert info.value.param == "max_tokens"
    ok = client.chat.completions.create(model=SERVED, messages=MSGS, max_tokens=512 - 18, extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 494
    unset = client.chat.completions.create(model=SERVED, messages=MSGS, extra_body={"ignore_eos": True})
    assert unset.usage.completion_tokens == 512 - 18  # chat default: max_model_len - prompt
    r = httpx.post(sim.base_url + "/completions", json={"prompt": long_text})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


def test_api_key():
    with start_simulator("--api-key", "sekret") as s:
        bad = httpx.post(s.base_url + "/chat/completions", json={"messages": MSGS},
                         headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.json() == {"error": "Unauthorized"}
        assert httpx.get(s.base_url + "/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.base_url, api_key="sekret", max_retries=0)
        assert good.chat.completions.create(model="Qwen/Qwen2.5-7B-Instruct", messages=MSGS).usage.completion_tokens == 16
        # only /v1 is protected, like vLLM
        assert httpx.get(s.root_url + "/health").status_code == 200
        assert httpx.get(s.root_url + "/metrics").status_code == 200


# --- other endpoints ---------------------------------------------------------------------

def test_models_lists_served_names_and_loras_with_parent(client, sim):
    models = {m.id: m for m in client.models.list()}
    assert list(models) == [SERVED, "qwen-alias", "sql-lora", "other-lora"]
    assert models[SERVED].owned_by == "vllm" and models[SERVED].model_extra["root"] == "Qwen/Qwen2.5-7B-Instruct"
    assert models[SERVED].model_extra["parent"] is None and models[SERVED].model_extra["max_model_len"] == 512
    assert models["sql-lora"].model_extra["parent"] == SERVED and models["sql-lora"].model_extra["root"] == "/loras/sql"
    assert models["other-lora"].model_extra["parent"] == "qwen-alias"
    assert models["sql-lora"].model_extra["max_model_len"] is None


def test_health_ping_version_tokenize_metrics_404(sim):
    h = httpx.get(sim.root_url + "/health")
    assert h.status_code == 200 and h.content == b""
    assert httpx.get(sim.root_url + "/ping").status_code == 200
    assert httpx.post(sim.root_url + "/ping").status_code == 200
    assert "version" in httpx.get(sim.root_url + "/version").json()
    tok = httpx.post(sim.root_url + "/tokenize", json={"prompt": "Hello, world!"}).json()
    assert tok["count"] == 4 and len(tok["tokens"]) == 4 and tok["max_model_len"] == 512
    tok = httpx.post(sim.root_url + "/tokenize", json={"messages": MSGS}).json()
    assert tok["count"] == PROMPT_TOKENS
    m = httpx.get(sim.root_url + "/metrics")
    assert m.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    r = httpx.get(sim.root_url + "/nothing-here")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_request_id_header_becomes_the_completion_id(sim):
    r = httpx.post(sim.base_url + "/chat/completions", json={"messages": MSGS}, headers={"X-Request-Id": "abc123"})
    assert r.json()["id"] == "chatcmpl-abc123"


def test_flat_error_format_of_older_vllm():
    with start_simulator("--error-format", "flat") as s:
        body = httpx.post(s.base_url + "/completions", json={"model": "nope", "prompt": "x"}).json()
        assert body == {"object": "error", "message": "The model `nope` does not exist.", "type": "NotFoundError",
                        "param": "model", "code": 404}
