"""Fault switches of the simulator: per-request header, CLI flag and runtime control."""
import json
import time

import httpx
import openai
import pytest

from proxy.simulator.testing import start_simulator

MSGS = [{"role": "user", "content": "Hi"}]
CHAT = {"messages": MSGS}
STREAM = {"messages": MSGS, "stream": True, "stream_options": {"include_usage": True}}


@pytest.fixture(scope="module")
def sim():
    with start_simulator() as handle:
        yield handle


@pytest.fixture(autouse=True)
def _reset(sim):
    yield
    sim.control(fault=None, dead=False, health_delay_s=5.0)


def post(sim, body, fault=None, timeout=5.0, path="/chat/completions"):
    headers = {"x-sim-fault": fault} if fault else {}
    return httpx.post(sim.base_url + path, json=body, headers=headers, timeout=timeout)


def read_stream(sim, body, fault):
    """Collect the SSE data lines and the exception that ended the read (if any)."""
    data, error = [], None
    try:
        with httpx.stream("POST", sim.base_url + "/chat/completions", json=body,
                          headers={"x-sim-fault": fault}, timeout=5) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data.append(line[6:])
    except httpx.TransportError as exc:
        error = exc
    return data, error


def test_refuse_closes_the_connection_without_a_response(sim):
    with pytest.raises(httpx.RemoteProtocolError):
        post(sim, CHAT, "refuse")
    client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0,
                           default_headers={"x-sim-fault": "refuse"})
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="Qwen/Qwen2.5-7B-Instruct", messages=MSGS)
    assert post(sim, CHAT).status_code == 200  # only that request was refused
    assert sim.stats()["faults"]["refuse"] == 2


def test_hang_sends_nothing_until_the_client_leaves(sim):
    t0 = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        post(sim, CHAT, "hang", timeout=0.4)
    assert time.perf_counter() - t0 >= 0.4
    with pytest.raises(httpx.ReadTimeout):  # streams too: not even the headers
        post(sim, STREAM, "hang", timeout=0.3)
    assert post(sim, CHAT).status_code == 200


def test_500_is_an_empty_body_and_the_sdk_sees_a_server_error(sim):
    r = post(sim, CHAT, "500")
    assert r.status_code == 500 and r.content == b""
    client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0, default_headers={"x-sim-fault": "500"})
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="Qwen/Qwen2.5-7B-Instruct", messages=MSGS)
    assert httpx.get(sim.root_url + "/health").status_code == 200  # not dead, just failing


def test_dead_engine_via_control(sim):
    sim.control(dead=True)
    assert httpx.get(sim.root_url + "/health").status_code == 503
    assert httpx.get(sim.root_url + "/ping").status_code == 503
    r = post(sim, CHAT)
    assert r.status_code == 500 and r.content == b""
    sim.control(dead=False)
    assert httpx.get(sim.root_url + "/health").status_code == 200
    assert post(sim, CHAT).status_code == 200


def test_cut_stream_closes_midway_without_done(sim):
    before = sim.stats()
    data, error = read_stream(sim, STREAM, "cut")
    assert isinstance(error, httpx.RemoteProtocolError)  # incomplete chunked body
    assert 1 <= len(data) <= 4 and "[DONE]" not in data
    assert all(json.loads(d)["choices"] for d in data)  # no usage chunk
    after = sim.stats()
    assert after["aborted"] == before["aborted"] + 1
    assert after["completion_tokens_reported"] == before["completion_tokens_reported"]


def test_cut_non_streamed_truncates_the_body(sim):
    with pytest.raises(httpx.RemoteProtocolError):
        post(sim, CHAT, "cut")


def test_error_chunk_then_done(sim):
    data, error = read_stream(sim, STREAM, "error_chunk")
    assert error is None
    assert data[-1] == "[DONE]"
    err = json.loads(data[-2])
    assert err == {"error": {"message": err["error"]["message"], "type": "InternalServerError",
                             "param": None, "code": 500}}
    assert all("error" not in json.loads(d) for d in data[:-2]) and len(data) >= 3
    client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0,
                           default_headers={"x-sim-fault": "error_chunk"})
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="Qwen/Qwen2.5-7B-Instruct", messages=MSGS, stream=True):
            pass
    assert post(sim, CHAT, "error_chunk").status_code == 500
    assert sim.metrics()['vllm:request_success_total{finished_reason="error"}'] >= 2


def test_garbage(sim):
    r = post(sim, CHAT, "garbage")
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    data, error = read_stream(sim, STREAM, "garbage")
    assert error is None and data[-1] == "[DONE]"
    bad = [d for d in data if not d.startswith("{") and d != "[DONE]"]
    assert len(bad) == 1
    client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0,
                           default_headers={"x-sim-fault": "garbage"})
    with pytest.raises(json.JSONDecodeError):
        for _ in client.chat.completions.create(model="Qwen/Qwen2.5-7B-Instruct", messages=MSGS, stream=True):
            pass


def test_slow_health(sim):
    sim.control(health_delay_s=0.3)
    t0 = time.perf_counter()
    assert httpx.get(sim.root_url + "/health").status_code == 200
    assert time.perf_counter() - t0 < 0.3  # the delay alone does nothing
    t0 = time.perf_counter()
    assert httpx.get(sim.root_url + "/health", headers={"x-sim-fault": "slow_health"}).status_code == 200
    assert 0.3 <= time.perf_counter() - t0 < 3
    sim.control(fault="slow_health")
    t0 = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):  # what a health checker with a short timeout sees
        httpx.get(sim.root_url + "/health", timeout=0.1)
    assert httpx.get(sim.root_url + "/health").status_code == 200
    assert post(sim, CHAT).status_code == 200  # /v1 is not affected


def test_control_applies_to_every_request_and_validates(sim):
    sim.control(fault="500")
    assert post(sim, CHAT).status_code == 500
    assert post(sim, {"prompt": "x"}, path="/completions").status_code == 500
    assert httpx.get(sim.base_url + "/models").status_code == 500
    assert httpx.get(sim.root_url + "/sim/control").json()["fault"] == "500"
    sim.control(fault=None)
    assert post(sim, CHAT).status_code == 200
    with pytest.raises(ValueError):
        sim.control(fault="explode")
    with pytest.raises(ValueError):
        sim.control(nonsense=1)
    r = post(sim, CHAT, "explode")
    assert r.status_code == 400 and "x-sim-fault" in r.json()["error"]["message"]


def test_cli_fault_flag_and_dead_flag():
    with start_simulator("--fault", "500") as s:
        assert httpx.post(s.base_url + "/chat/completions", json=CHAT).status_code == 500
        assert httpx.get(s.root_url + "/health").status_code == 200
        s.control(fault=None)
        assert httpx.post(s.base_url + "/chat/completions", json=CHAT).status_code == 200
    with start_simulator("--dead") as s:
        assert httpx.get(s.root_url + "/health").status_code == 503
        assert httpx.post(s.base_url + "/completions", json={"prompt": "x"}).status_code == 500


def test_stop_makes_connections_refused_and_kill_works():
    s = start_simulator()
    url = s.base_url + "/models"
    assert httpx.get(url).status_code == 200
    s.stop()
    assert not s.alive
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)
    k = start_simulator()
    k.kill()
    assert not k.alive and k.process.returncode == -9


def test_html_502_is_a_proxys_error_page(sim):
    r = post(sim, CHAT, "html_502")
    assert r.status_code == 502 and r.headers["content-type"].startswith("text/html")
    assert b"<title>502 Bad Gateway</title>" in r.content
    assert post(sim, STREAM, "html_502").status_code == 502  # streams too: before any event
    client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0,
                           default_headers={"x-sim-fault": "html_502"})
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model="Qwen/Qwen2.5-7B-Instruct", messages=MSGS)
    assert exc.value.status_code == 502
    assert sim.stats()["faults"]["html_502"] == 3


def test_huge_line_sends_10_mb_without_a_newline_then_closes(sim):
    data, error = [], None
    tail = b""
    try:
        with httpx.stream("POST", sim.base_url + "/chat/completions", json=STREAM,
                          headers={"x-sim-fault": "huge_line"}, timeout=10) as r:
            assert r.status_code == 200
            for piece in r.iter_raw():
                tail = (tail + piece)[-(11 << 20):]
    except httpx.TransportError as exc:
        error = exc
    assert isinstance(error, httpx.RemoteProtocolError)  # closed mid-body, no [DONE]
    events = tail.split(b"\n\n")
    assert len(events[-1]) >= 10 * 1024 * 1024 and b"\n" not in events[-1]
    assert events[-1].startswith(b"data: xxxx") and b"[DONE]" not in tail
    assert all(json.loads(e[6:])["choices"] for e in events[:-1] if e.startswith(b"data: "))
    with pytest.raises(httpx.RemoteProtocolError):  # non-streamed: one huge unfinished JSON line
        post(sim, CHAT, "huge_line", timeout=10)
    assert sim.stats()["faults"]["huge_line"] == 2
    assert post(sim, CHAT).status_code == 200
