"""The /v1 gateway end to end: the real openai SDK → uvicorn (QwenHub) → the simulator."""
import asyncio
from datetime import timedelta

import httpx
import openai
import pytest
from django.utils import timezone

from billing.models import UsageRecord
from proxy.gateway import errors
from proxy.gateway.tests.conftest import MODEL, SERVED, free_port, make_world, wait_for
from proxy.simulator.testing import start_simulator
from proxy.simulator.tokens import chat_prompt_tokens, completion_prompt_tokens, count_text_tokens
from tenants.models import ApiKey, QuotaCounter
from tenants.services import api_key_revoke

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello, who are you?"}]
PROMPT = chat_prompt_tokens(MESSAGES)
DEFAULT_COMPLETION = 16  # the simulator's --response-tokens


def rows_for(member, count: int = 1):
    """The member's usage rows, once `count` of them are written."""
    wait_for(lambda: UsageRecord.objects.filter(member=member).count() >= count)
    return list(UsageRecord.objects.filter(member=member).order_by("started_at"))


def counter_for(member) -> QuotaCounter:
    return QuotaCounter.objects.get(member=member)


# --- the happy paths: the client sees what vLLM sends, the row has vLLM's counts ---------------

def test_chat_non_streamed(world):
    raw = world.client().chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    completion = raw.parse()
    assert completion.model == MODEL  # restored to the name the client used
    assert completion.id.startswith("chatcmpl-")
    assert completion.usage.prompt_tokens == PROMPT
    assert completion.usage.completion_tokens == DEFAULT_COMPLETION
    assert count_text_tokens(completion.choices[0].message.content) == DEFAULT_COMPLETION
    assert raw.headers["x-request-id"].startswith("req_")
    assert float(raw.headers["x-qwenhub-overhead-ms"]) >= 0
    [row] = rows_for(world.member)
    assert row.request_id == raw.headers["x-request-id"]
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (PROMPT, 16, PROMPT + 16)
    assert (row.status, row.http_status, row.stream, row.model) == ("ok", 200, False, MODEL)
    assert row.upstream == world.upstream.name and row.api_key_id is not None and row.ttft_ms > 0
    counter = counter_for(world.member)
    assert (counter.requests_used, counter.requests_reserved) == (1, 0)
    assert (counter.tokens_used, counter.tokens_reserved) == (PROMPT + 16, 0)


def test_alias_is_routed_and_echoed(world):
    completion = world.client().chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=5)
    assert completion.model == "qwen"
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"
    assert rows_for(world.member)[0].model == MODEL


def test_n_choices_sum_completion_tokens(world):
    completion = world.client().chat.completions.create(model=MODEL, messages=MESSAGES, n=3, max_tokens=4)
    assert len(completion.choices) == 3
    assert completion.usage.completion_tokens == 12
    assert rows_for(world.member)[0].completion_tokens == 12


def test_completions_and_embeddings(world, embed_sim):
    from proxy.services import upstream_add

    upstream_add(name=f"{world.upstream.name}-embed", base_url=embed_sim.base_url, served_name="BAAI/bge-m3",
                 public_name="bge-m3", max_concurrency=8)
    client = world.client()
    prompt = "Once upon a time, there was"
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7)
    assert completion.model == MODEL and completion.usage.completion_tokens == 7
    embedding = wait_for(lambda: _embed(client))  # the routing table reloads within its cache time
    assert embedding.model == "bge-m3"
    assert len(embedding.data[0].embedding) > 0 and embedding.usage.prompt_tokens == 2
    rows = rows_for(world.member, 2)
    by_endpoint = {r.endpoint: r for r in rows}
    assert by_endpoint["completions"].prompt_tokens == completion_prompt_tokens(prompt)
    assert by_endpoint["completions"].completion_tokens == 7
    assert (by_endpoint["embeddings"].prompt_tokens, by_endpoint["embeddings"].completion_tokens) == (2, 0)


def _embed(client):
    try:
        return client.embeddings.create(model="bge-m3", input="hello world")  # the SDK asks for base64
    except openai.NotFoundError:
        return None


def test_embeddings_of_a_generative_model_are_refused_as_vllm_does(world):
    with pytest.raises(openai.BadRequestError) as refused:
        world.client().embeddings.create(model=MODEL, input="hello world")
    assert refused.value.body["message"] == "The model does not support Embeddings API"
    row = rows_for(world.member)[0]
    assert (row.endpoint, row.status, row.http_status, row.total_tokens) == ("embeddings", "client_error", 400, 0)


def test_stream_without_usage_looks_like_vllm(world):
    chunks = list(world.client().chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices for c in chunks), "the usage-only chunk must be hidden"
    assert all(c.usage is None for c in chunks), "per-chunk usage must be hidden"
    assert all(c.model == MODEL for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert count_text_tokens(text) == DEFAULT_COMPLETION
    [row] = rows_for(world.member)
    assert (row.prompt_tokens, row.completion_tokens, row.stream, row.status) == (PROMPT, 16, True, "ok")


def test_stream_with_include_usage(world):
    chunks = list(world.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, max_tokens=9))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == PROMPT
    assert all(c.usage is None for c in chunks[:-1])
    assert rows_for(world.member)[0].completion_tokens == 9


def test_stream_with_continuous_usage(world):
    chunks = list(world.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, max_tokens=6,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    running = [c.usage.completion_tokens for c in chunks if c.choices]
    assert running == sorted(running) and running[0] == 0 and running[-1] == 6
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == PROMPT + 6


def test_stream_n_choices(world):
    chunks = list(world.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, n=2, max_tokens=3, stream_options={"include_usage": True}))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert chunks[-1].usage.completion_tokens == 6
    assert rows_for(world.member)[0].completion_tokens == 6


def test_completions_stream_keeps_usage_null(world):
    response = httpx.post(
        world.gateway.url + "/v1/completions", headers={"Authorization": f"Bearer {world.key}"},
        json={"model": MODEL, "prompt": "Say hi", "max_tokens": 3, "stream": True}, timeout=10)
    events = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all('"usage":null' in e for e in events[:-1]), events
    assert rows_for(world.member)[0].completion_tokens == 3


def test_async_client_streams(world):
    async def run():
        async with world.async_client() as client:
            stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=5)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

    assert count_text_tokens(asyncio.run(run())) == 5


# --- models -------------------------------------------------------------------------------

def test_models_lists_only_what_the_member_may_use(world):
    from proxy.models import PublicModel
    from proxy.services import upstream_add

    upstream_add(name="other", base_url=world.upstream.base_url, served_name=SERVED, public_name="secret-model")
    assert {m.id for m in world.client().models.list()} == {MODEL, "secret-model"}
    member, key = world.add_member()
    member.allowed_models.set([PublicModel.objects.get(name=MODEL)])
    client = world.client(key)
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("secret-model")
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="secret-model", messages=MESSAGES)


# --- the bad paths -------------------------------------------------------------------------

def _assert_401(call):
    with pytest.raises(openai.AuthenticationError) as exc:
        call()
    assert exc.value.status_code == 401
    assert exc.value.body["message"] == errors.INVALID_KEY
    assert exc.value.code == "invalid_api_key"


def test_every_bad_key_gets_the_same_401(world):
    make = lambda key: (lambda: world.client(key).chat.completions.create(model=MODEL, messages=MESSAGES))  # noqa: E731
    _assert_401(make("qh_not-a-real-key"))  # malformed (bad checksum)
    _assert_401(make("sk-unknown-but-plausible"))  # unknown
    _assert_401(lambda: world.client("x").models.list())
    revoked_member, revoked = world.add_member()
    api_key_revoke(key=ApiKey.objects.get(member=revoked_member))
    _assert_401(make(revoked))
    expired_member, expired = world.add_member()
    ApiKey.objects.filter(member=expired_member).update(expires_at=timezone.now() - timedelta(seconds=1))
    _assert_401(make(expired))
    inactive_member, inactive = world.add_member()
    inactive_member.is_active = False
    inactive_member.save(update_fields=["is_active"])
    _assert_401(make(inactive))
    response = httpx.get(world.gateway.url + "/v1/models", timeout=5)
    assert response.status_code == 401 and response.json()["error"]["message"] == errors.INVALID_KEY
    assert not UsageRecord.objects.exists()


def test_key_headers_and_revocation_within_seconds(world):
    for header in ({"Authorization": f"Bearer {world.key}"}, {"api-key": world.key}, {"x-api-key": world.key}):
        assert httpx.get(world.gateway.url + "/v1/models", headers=header, timeout=5).status_code == 200
    api_key_revoke(key=ApiKey.objects.get(member=world.member))
    # the gateway caches keys for QWENHUB_KEY_CACHE_SECONDS (1 s in tests, 3 s by default)
    status = wait_for(lambda: httpx.get(world.gateway.url + "/v1/models", headers={"x-api-key": world.key},
                                        timeout=5).status_code == 401, timeout=5)
    assert status


def test_bad_requests(world):
    url, auth = world.gateway.url + "/v1/chat/completions", {"Authorization": f"Bearer {world.key}"}
    bad_json = httpx.post(url, headers=auth, content=b"{not json", timeout=5)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    no_messages = httpx.post(url, headers=auth, json={"model": MODEL}, timeout=5)
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    not_object = httpx.post(url, headers=auth, json=[1, 2], timeout=5)
    assert not_object.status_code == 400
    big = httpx.post(url, headers=auth, content=b'{"model": "x", "pad": "' + b"a" * (2 * 1024 * 1024) + b'"}',
                     timeout=10)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    unknown_path = httpx.get(world.gateway.url + "/v1/nothing", headers=auth, timeout=5)
    assert unknown_path.status_code == 404 and "error" in unknown_path.json()
    with pytest.raises(openai.NotFoundError) as exc:
        world.client().chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert exc.value.code == "model_not_found" and exc.value.param == "model"
    # upstream validation errors pass through in OpenAI's shape (the prompt does not leave room
    # for this completion: only vLLM, which counts the prompt's tokens, can tell)
    with pytest.raises(openai.BadRequestError) as exc:
        world.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=32767)
    assert "max" in exc.value.message.lower()
    wait_for(lambda: UsageRecord.objects.filter(member=world.member).exists())
    # the client's mistake, not the upstream's failure: an admin can tell them apart
    assert UsageRecord.objects.get(member=world.member).status == UsageRecord.Status.CLIENT_ERROR
    assert counter_for(world.member).tokens_reserved == 0 and counter_for(world.member).requests_used == 0


def test_upstream_down_is_503_and_fails_over(transactional_db, gateway, sim):
    world = make_world(gateway, f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    with pytest.raises(openai.InternalServerError) as exc:
        world.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert exc.value.status_code == 503 and exc.value.code == "upstream_unavailable"
    [row] = rows_for(world.member)
    assert (row.status, row.http_status, row.total_tokens) == ("upstream_unavailable", 503, 0)
    counter = counter_for(world.member)
    assert (counter.requests_used, counter.requests_reserved, counter.tokens_reserved) == (0, 0, 0)

    from proxy.services import upstream_add

    upstream_add(name="replica", base_url=sim.base_url, served_name=SERVED, public_name=MODEL)
    for _ in range(3):
        completion = world.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        assert completion.usage.completion_tokens == 2
    rows = rows_for(world.member, 4)
    assert [r.upstream for r in rows[1:]] == ["replica"] * 3


def test_upstream_hang_is_504(transactional_db, gateway):
    with start_simulator("--model", SERVED, "--fault", "hang") as hanging:
        world = make_world(gateway, hanging.base_url)
        with pytest.raises(openai.APIStatusError) as exc:
            world.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert exc.value.status_code == 504
    [row] = rows_for(world.member)
    assert (row.status, row.total_tokens) == ("upstream_timeout", 0)
    assert counter_for(world.member).tokens_reserved == 0


def test_upstream_500_is_502_not_500(transactional_db, gateway):
    with start_simulator("--model", SERVED, "--fault", "500") as broken:
        world = make_world(gateway, broken.base_url)
        with pytest.raises(openai.InternalServerError) as exc:
            world.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    assert exc.value.status_code == 502 and exc.value.code == "bad_gateway"


@pytest.mark.parametrize("fault", ["cut", "error_chunk", "garbage"])
def test_stream_broken_midway_ends_with_error_and_done(transactional_db, gateway, fault):
    with start_simulator("--model", SERVED, "--fault", fault) as sim:
        world = make_world(gateway, sim.base_url)
        response = httpx.post(
            world.gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {world.key}"},
            json={"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 50}, timeout=10)
        assert response.status_code == 200
        events = [e for e in response.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert '"error"' in events[-2]
        with pytest.raises(openai.APIError):
            for _ in world.client().chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=50):
                pass
    rows = rows_for(world.member, 2)
    assert {r.status for r in rows} == {"upstream_error"}
    for row in rows:
        assert row.completion_tokens < 50  # never the full max_tokens, never the error text
    counter = counter_for(world.member)
    assert (counter.requests_reserved, counter.tokens_reserved) == (0, 0)
    assert counter.tokens_used == sum(r.total_tokens for r in rows)


def test_client_disconnect_mid_stream(transactional_db, gateway):
    with start_simulator("--model", SERVED, "--itl-ms", "50", "--response-tokens", "200") as slow:
        world = make_world(gateway, slow.base_url)
        stream = world.client().chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, max_tokens=200)
        received = 0
        for chunk in stream:
            received += 1
            if received == 5:
                break
        stream.close()
        [row] = rows_for(world.member)
        assert row.status == "client_disconnected"
        assert row.prompt_tokens == PROMPT
        assert 3 <= row.completion_tokens < 200
        stats = wait_for(lambda: (s := httpx.get(slow.root_url + "/sim/stats").json())["aborted"] >= 1 and s)
        assert stats["aborted"] == 1 and stats["running"] == 0
    counter = counter_for(world.member)
    assert (counter.requests_used, counter.requests_reserved, counter.tokens_reserved) == (1, 0, 0)
    assert counter.tokens_used == row.total_tokens


def test_one_row_per_request_under_100_concurrent(world):
    async def run():
        async with world.async_client() as client:
            async def one(i):
                if i % 2:
                    stream = await client.chat.completions.create(
                        model=MODEL, messages=MESSAGES, stream=True, max_tokens=3)
                    return [c async for c in stream]
                return await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)

            return await asyncio.gather(*(one(i) for i in range(100)))

    assert len(asyncio.run(run())) == 100
    rows = rows_for(world.member, 100)
    assert len(rows) == 100 and len({r.request_id for r in rows}) == 100
    assert all(r.status == "ok" and r.completion_tokens == 3 for r in rows)
    counter = counter_for(world.member)
    assert (counter.requests_used, counter.requests_reserved, counter.tokens_reserved) == (100, 0, 0)
    assert counter.tokens_used == 100 * (PROMPT + 3)


def test_plain_key_is_never_logged_or_stored(world):
    world.client().chat.completions.create(model=MODEL, messages=MESSAGES)
    _assert_401(lambda: world.client(world.key + "x").chat.completions.create(model=MODEL, messages=MESSAGES))
    rows_for(world.member)
    log = world.gateway.log_text()
    assert world.key not in log and world.key[12:] not in log
    assert "Hello, who are you" not in log  # no prompts in logs either
    assert f"member={world.member.user.username}" in log  # the request line is there
    from django.db import connection

    with connection.cursor() as cursor:
        for table in ("tenants_apikey", "billing_usagerecord", "tenants_auditevent"):
            cursor.execute(f"SELECT * FROM {table}")
            assert world.key not in repr(cursor.fetchall())


def test_metrics_endpoint(world):
    world.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    _assert_401(lambda: world.client("sk-nobody-has-this-key").models.list())
    rows_for(world.member)
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(world.gateway.url + "/metrics", timeout=5).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    user = world.member.user.username
    assert samples[("qwenhub_requests_total", (("member", user), ("model", MODEL), ("status", "ok")))] == 1
    assert samples[("qwenhub_tokens_total", (("kind", "completion"), ("member", user), ("model", MODEL)))] == 3
    assert samples[("qwenhub_auth_failures_total", ())] >= 1
    assert samples[("qwenhub_upstream_up", (("upstream", world.upstream.name),))] == 1
    assert samples[("qwenhub_gateway_overhead_seconds_count", ())] >= 1
    assert world.key not in text


def _statements(world) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(world.gateway.url + "/metrics", timeout=5).text
    return {s.labels["kind"]: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "qwenhub_db_statements_total"}


def test_metrics_count_the_database_statements_of_requests(world):
    """Two statements per request (reserve, settle); the member's first request also opens its month's counter."""
    before = _statements(world)
    for _ in range(3):
        world.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert len(rows_for(world.member, 3)) == 3
    assert wait_for(lambda: _statements(world).get("settle", 0) - before.get("settle", 0) == 3)
    after = _statements(world)
    assert after["reserve"] - before.get("reserve", 0) == 3 + 1 + 1  # UPDATE, INSERT, UPDATE; then UPDATE each


def test_metrics_need_the_token_when_one_is_set(transactional_db, tmp_path):
    from proxy.gateway.tests.conftest import GatewayProcess

    gw = GatewayProcess(tmp_path, QWENHUB_METRICS_TOKEN="scrape-secret")
    try:
        assert httpx.get(gw.url + "/metrics", timeout=5).status_code == 403
        response = httpx.get(gw.url + "/metrics", headers={"Authorization": "Bearer scrape-secret"}, timeout=5)
        assert response.status_code == 200 and "qwenhub_requests" in response.text
    finally:
        gw.stop()


def _upstream_up(world) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(world.gateway.url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qwenhub_upstream_up" and sample.labels["upstream"] == world.upstream.name:
                return sample.value
    return None


def test_health_check_marks_upstreams_down_and_up(transactional_db, gateway):
    with start_simulator("--model", SERVED) as sim:
        world = make_world(gateway, sim.base_url)
        assert wait_for(lambda: _upstream_up(world) == 1.0)
        sim.control(dead=True)  # the engine died: /health answers 503
        assert wait_for(lambda: _upstream_up(world) == 0.0)
        sim.control(dead=False)
        assert wait_for(lambda: _upstream_up(world) == 1.0)
        assert world.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).usage


def test_database_down_is_a_fast_503(transactional_db, tmp_path):
    """With PostgreSQL unreachable the gateway answers 503 at once (which the SDK retries), never hangs."""
    import time as _time

    from proxy.gateway.tests.conftest import GatewayProcess

    gw = GatewayProcess(tmp_path, DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/nowhere")
    try:
        started = _time.monotonic()
        response = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": "Bearer sk-some-old-key-1"},
                              json={"model": MODEL, "messages": MESSAGES}, timeout=10)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"
        assert _time.monotonic() - started < 3
    finally:
        gw.stop()


def test_max_tokens_beyond_the_context_window_is_vllms_400_before_any_quota(transactional_db, gateway, sim):
    """Not a 429 insufficient_quota: the request could never run, whatever the quota left."""
    world = make_world(gateway, sim.base_url, token_quota=1000)
    with pytest.raises(openai.BadRequestError) as exc:
        world.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10**6)
    assert exc.value.status_code == 400 and exc.value.param == "max_tokens"
    assert exc.value.body["message"] == errors.MAX_TOKENS_TOO_LARGE.format(max_tokens=10**6, max_model_len=32768)
    assert not QuotaCounter.objects.filter(member=world.member, tokens_reserved__gt=0).exists()
    assert not UsageRecord.objects.filter(member=world.member).exists()  # refused before admission, as bad JSON is
