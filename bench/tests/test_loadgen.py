"""The benchmark's load generator against a live simulator: closed loops, streams, staggered starts."""
from bench.loadgen import percentile, run_load_sync, summarize
from proxy.simulator.testing import start_simulator

BODY = {"model": "Qwen/Qwen2.5-7B-Instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_closed_loop_counts_requests_and_reads_streams_to_done():
    with start_simulator("--ttft-ms", "0", "--itl-ms", "0") as sim:
        records = run_load_sync(sim.root_url, "/v1/chat/completions", dict(BODY, stream=True), concurrency=4,
                                total=20, stream=True)
    assert [r.index for r in records] == list(range(20))
    assert all(r.ok and r.status == 200 and r.ttft is not None for r in records)
    assert summarize(records)["ok"] == 20


def test_errors_are_records_not_exceptions():
    with start_simulator() as sim:
        records = run_load_sync(sim.root_url, "/v1/chat/completions", dict(BODY, model="no-such-model"),
                                concurrency=2, total=4)
    assert [r.status for r in records] == [404] * 4
    assert not any(r.ok for r in records)
    assert summarize(records)["errors"] == {"HTTP 404": 4}


def test_stagger_spreads_the_first_requests():
    # Each request lasts 0.5 s, so every worker sends exactly one of the 8.
    with start_simulator("--ttft-ms", "500", "--itl-ms", "0") as sim:
        burst = run_load_sync(sim.root_url, "/v1/chat/completions", BODY, concurrency=8, total=8)
        spread = run_load_sync(sim.root_url, "/v1/chat/completions", BODY, concurrency=8, total=8, stagger=0.4)
    assert max(r.start for r in burst) < 0.05
    starts = sorted(r.start for r in spread)
    assert 0.3 < starts[-1] < 0.6  # worker 7 starts after 7/8 of 0.4 s
    assert all(b - a > 0.03 for a, b in zip(starts, starts[1:]))


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
