"""Scheduler, latency model, disconnects/aborts and metrics accounting of the simulator."""
import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest

from proxy.simulator.metrics import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS
from proxy.simulator.testing import start_simulator
from proxy.simulator.tokens import chat_prompt_tokens, completion_prompt_tokens

MSGS = [{"role": "user", "content": "Count, please."}]
ABORT = 'vllm:request_success_total{finished_reason="abort"}'


def wait_for(predicate, timeout=5.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def test_queue_holds_requests_beyond_max_num_seqs_and_releases_them():
    with start_simulator("--max-num-seqs", "2", "--itl-ms", "15", "--response-tokens", "20") as sim:
        seen = []
        stop = threading.Event()

        def scrape():
            while not stop.is_set():
                m = sim.metrics()
                seen.append((m["vllm:num_requests_running"], m["vllm:num_requests_waiting"]))
                time.sleep(0.01)

        async def five():
            async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as client:
                return await asyncio.gather(*(
                    client.chat.completions.create(model="Qwen/Qwen2.5-7B-Instruct", messages=MSGS)
                    for _ in range(5)))

        scraper = threading.Thread(target=scrape)
        scraper.start()
        try:
            results = asyncio.run(five())
        finally:
            stop.set()
            scraper.join()
        assert [r.usage.completion_tokens for r in results] == [20] * 5
        assert (2.0, 3.0) in seen  # 2 running, 3 waiting at some point
        assert max(r for r, _ in seen) <= 2
        stats = sim.stats()
        assert stats["max_running_seen"] == 2 and stats["max_waiting_seen"] == 3
        assert stats["running"] == 0 and stats["waiting"] == 0 and stats["completed"] == 5
        m = sim.metrics()
        assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0


def test_latency_model_ttft_and_itl():
    args = ("--ttft-ms", "100", "--prefill-ms-per-token", "2", "--itl-ms", "20", "--response-tokens", "6")
    with start_simulator(*args) as sim:
        prompt = chat_prompt_tokens(MSGS)  # 4 + 4 + 2 = 10 -> TTFT 120 ms, then 5 x 20 ms
        t0 = time.perf_counter()
        with httpx.stream("POST", sim.base_url + "/chat/completions",
                          json={"messages": MSGS, "stream": True}) as r:
            arrivals = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter() - t0)
        assert prompt == 10
        assert 0.115 <= arrivals[0] < 0.5
        gaps = [b - a for a, b in zip(arrivals[1:], arrivals[2:])]
        assert len(gaps) == 5 and all(0.015 <= g < 0.2 for g in gaps)
        m = sim.metrics()
        assert m["vllm:time_to_first_token_seconds_count"] == 1
        assert 0.115 <= m["vllm:time_to_first_token_seconds_sum"] < 0.5
        assert m["vllm:inter_token_latency_seconds_count"] == 5
        # non-streamed requests take the same time
        t0 = time.perf_counter()
        httpx.post(sim.base_url + "/chat/completions", json={"messages": MSGS})
        assert time.perf_counter() - t0 >= 0.2


def test_load_factor_slows_tokens_when_busy():
    with start_simulator("--max-num-seqs", "3", "--itl-ms", "10", "--load-factor", "3",
                         "--response-tokens", "11") as sim:
        def timed(n):
            async def go():
                async with httpx.AsyncClient(timeout=10) as c:
                    t0 = time.perf_counter()
                    await asyncio.gather(*(c.post(sim.base_url + "/completions", json={"prompt": "x"})
                                           for _ in range(n)))
                    return time.perf_counter() - t0
            return asyncio.run(go())
        alone = timed(1)   # 10 tokens x 10 ms
        busy = timed(3)    # 10 tokens x 30 ms (factor 3 with all 3 slots running)
        assert alone >= 0.1 and busy >= 0.25 and busy > 2 * alone * 0.9


def _stream_and_drop(sim, n_events=3, body=None):
    body = body or {"messages": MSGS, "stream": True, "stream_options": {"include_usage": True,
                                                                        "continuous_usage_stats": True}}
    seen = []
    with httpx.Client(timeout=10) as c:
        with c.stream("POST", sim.base_url + "/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen.append(json.loads(line[6:]))
                    if len(seen) == n_events:
                        break
    return seen


def test_stream_disconnect_frees_the_slot_and_counts_an_abort():
    with start_simulator("--max-num-seqs", "1", "--itl-ms", "20", "--response-tokens", "200") as sim:
        seen = _stream_and_drop(sim)
        assert seen[-1]["usage"]["completion_tokens"] == 2
        wait_for(lambda: sim.stats()["running"] == 0)
        stats = sim.stats()
        assert stats["aborted"] == 1 and stats["completed"] == 0
        assert sim.metrics()[ABORT] == 1
        # the generated tokens were counted like vLLM does, and reconciled as unreported
        m = sim.metrics()
        assert 2 <= stats["generation_tokens_unreported"] < 200
        assert m["vllm:generation_tokens_total"] == stats["generation_tokens_unreported"]
        assert stats["completion_tokens_reported"] == 0
        # the only slot is free again: a new request runs at once
        r = httpx.post(sim.base_url + "/chat/completions", json={"messages": MSGS, "max_tokens": 2}, timeout=5)
        assert r.status_code == 200


def test_non_streamed_disconnect_aborts():
    with start_simulator("--itl-ms", "20", "--response-tokens", "100") as sim:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(sim.base_url + "/chat/completions", json={"messages": MSGS}, timeout=0.3)
        wait_for(lambda: sim.stats()["aborted"] == 1)
        assert sim.stats()["running"] == 0
        assert sim.metrics()[ABORT] == 1


def test_disconnect_while_queued_leaves_the_queue():
    with start_simulator("--max-num-seqs", "1", "--itl-ms", "20", "--response-tokens", "200") as sim:
        holder = httpx.Client(timeout=10)
        with holder.stream("POST", sim.base_url + "/chat/completions",
                           json={"messages": MSGS, "stream": True}) as running:
            lines = running.iter_lines()  # keep a reference: a collected iterator closes the stream
            next(lines)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(sim.base_url + "/chat/completions", json={"messages": MSGS}, timeout=0.3)
            wait_for(lambda: sim.stats()["aborted"] == 1)
            stats = sim.stats()
            assert stats["waiting"] == 0 and stats["running"] == 1
            assert stats["prompt_tokens_unreported"] == 0  # never prefilled
        holder.close()
        wait_for(lambda: sim.stats()["running"] == 0)
        assert sim.metrics()[ABORT] == 2


def test_metrics_counters_equal_the_sum_of_reported_usage():
    with start_simulator("--served-model-name", "qwen") as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="x", max_retries=0)
        prompt_sum = completion_sum = 0
        r = client.chat.completions.create(model="qwen", messages=MSGS, n=3, max_tokens=7)
        prompt_sum += r.usage.prompt_tokens
        completion_sum += r.usage.completion_tokens
        r = client.completions.create(model="qwen", prompt=["one two", "three, four"], max_tokens=5)
        prompt_sum += r.usage.prompt_tokens
        completion_sum += r.usage.completion_tokens
        for chunk in client.chat.completions.create(model="qwen", messages=MSGS, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.usage:
                prompt_sum += chunk.usage.prompt_tokens
                completion_sum += chunk.usage.completion_tokens
        # a stream without usage: the rule gives what it would have reported
        list(client.chat.completions.create(model="qwen", messages=MSGS, stream=True, max_tokens=3))
        prompt_sum += chat_prompt_tokens(MSGS)
        completion_sum += 3
        assert prompt_sum == 10 * 3 + completion_prompt_tokens(["one two", "three, four"])  # n>1: prompt once
        m = sim.metrics()
        stats = sim.stats()
        assert m["vllm:prompt_tokens_total"] == prompt_sum == stats["prompt_tokens_reported"]
        assert m["vllm:generation_tokens_total"] == completion_sum == stats["completion_tokens_reported"]
        assert stats["prompt_tokens_unreported"] == stats["generation_tokens_unreported"] == 0
        # one success per choice: 3 chat choices + 2 prompts + 2 streams
        assert m["vllm:request_success_total"] == 7 and m[ABORT] == 0
        assert m['vllm:request_success_total{finished_reason="length"}'] == 6
        assert m["vllm:e2e_request_latency_seconds_count"] == 4


def test_metrics_exposition_names_types_labels_and_buckets():
    with start_simulator("--served-model-name", "qwen", "other") as sim:
        httpx.post(sim.base_url + "/chat/completions", json={"messages": MSGS, "model": "other"})
        text = sim.metrics_text()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert types["vllm:num_requests_running"] == "gauge"
    assert types["vllm:num_requests_waiting"] == "gauge"
    assert types["vllm:kv_cache_usage_perc"] == "gauge"
    assert types["vllm:prompt_tokens_total"] == "counter"
    assert types["vllm:generation_tokens_total"] == "counter"
    assert types["vllm:request_success_total"] == "counter"
    for h in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds"):
        assert types[h] == "histogram"
    assert 'vllm:prompt_tokens_total{engine="0",model_name="qwen"} 10.0' in text
    assert 'vllm:request_success_total{engine="0",finished_reason="stop",model_name="qwen"} 1.0' in text

    def bounds(name):
        return [float(b) for b in re.findall(rf'^{re.escape(name)}_bucket{{.*le="([^"]+)".*}}', text, re.M)
                if b != "+Inf"]
    assert bounds("vllm:time_to_first_token_seconds") == TTFT_BUCKETS and len(TTFT_BUCKETS) == 22
    assert bounds("vllm:inter_token_latency_seconds") == ITL_BUCKETS
    assert bounds("vllm:e2e_request_latency_seconds") == REQUEST_LATENCY_BUCKETS


def test_jitter_is_bounded_and_reproducible_with_a_seed():
    from proxy.simulator.config import parse_args
    from proxy.simulator.engine import Engine

    def delays(seed):
        engine = Engine(parse_args(["--jitter", "0.5", "--seed", str(seed)]))
        return [engine._delay(100.0) for _ in range(50)]

    a = delays(7)
    assert a == delays(7) and a != delays(8)
    assert all(0.05 <= d <= 0.15 for d in a) and len(set(a)) > 40
    assert Engine(parse_args([]))._delay(100.0) == 0.1  # no jitter: exact


def test_scheduler_is_fifo_and_cancelled_waiters_leave_the_queue():
    from proxy.simulator.scheduler import Scheduler

    async def main():
        sched = Scheduler(2, 100)
        order = []

        async def job(i):
            await sched.acquire(10)
            order.append(i)
            await asyncio.sleep(0.02)
            sched.release(10)

        tasks = [asyncio.create_task(job(i)) for i in range(6)]
        await asyncio.sleep(0.005)
        assert (sched.running, sched.waiting, sched.kv_tokens) == (2, 4, 20)
        tasks[3].cancel()
        await asyncio.sleep(0)
        assert sched.waiting == 3
        await asyncio.gather(*tasks, return_exceptions=True)
        return order, sched

    order, sched = asyncio.run(main())
    assert order == [0, 1, 2, 4, 5]
    assert (sched.running, sched.waiting, sched.kv_tokens, sched.max_running_seen) == (0, 0, 0, 2)
