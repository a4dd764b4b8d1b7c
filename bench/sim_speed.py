"""Measure the simulator's own speed: ``python -m bench.sim_speed [--concurrency 64] [--duration 5]``.

The simulator runs as one process pinned to CPU 0 (``taskset -c 0`` when available);
the load generator runs in this process, pinned to the other CPUs. All delays are 0,
so this is pure HTTP/JSON/SSE overhead. Besides requests/s it prints the simulator's
CPU use (from /proc) so a client-bound run is visible: ``cpu_util`` near 1.0 means the
simulator core was saturated; ``capacity_rps`` = 1 / (simulator CPU seconds per request).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time

from bench.loadgen import run_load_sync, summarize
from proxy.simulator.testing import start_simulator


def _cpu_seconds(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def measure(sim, path: str, body: dict, *, stream: bool, concurrency: int, duration: float) -> dict:
    run_load_sync(sim.root_url, path, body, concurrency=concurrency, total=max(500, concurrency * 10), stream=stream)
    c0, t0 = _cpu_seconds(sim.process.pid), time.perf_counter()
    records = run_load_sync(sim.root_url, path, body, concurrency=concurrency, duration=duration, stream=stream)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds(sim.process.pid) - c0
    s = summarize(records, wall)
    s["sim_cpu_util"] = cpu / wall
    s["sim_cpu_us_per_request"] = cpu / max(1, s["ok"]) * 1e6
    s["capacity_rps"] = s["ok"] / cpu if cpu > 0 else None
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    ap.add_argument("--tokens", type=int, default=16, help="completion tokens per request")
    ap.add_argument("--tokens-per-chunk", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the full summaries as JSON")
    args = ap.parse_args()

    ncpu = os.cpu_count() or 1
    prefix: tuple[str, ...] = ()
    if shutil.which("taskset") and ncpu > 1:
        prefix = ("taskset", "-c", "0")
        os.sched_setaffinity(0, set(range(1, ncpu)))
    sim_args = ["--response-tokens", str(args.tokens), "--tokens-per-chunk", str(args.tokens_per_chunk),
                "--max-num-seqs", "256", "--log-level", "error"]
    body = {"model": "Qwen/Qwen2.5-7B-Instruct",
            "messages": [{"role": "user", "content": "Tell me something about benchmarks, please."}]}
    results = {}
    with start_simulator(*sim_args, prefix=prefix) as sim:
        results["non_streamed"] = measure(sim, "/v1/chat/completions", body, stream=False,
                                          concurrency=args.concurrency, duration=args.duration)
        results["streamed"] = measure(sim, "/v1/chat/completions", {**body, "stream": True}, stream=True,
                                      concurrency=args.concurrency, duration=args.duration)
    print(f"machine: {platform.processor() or platform.machine()}, {ncpu} CPUs; simulator pinned: {bool(prefix)}; "
          f"concurrency {args.concurrency}, {args.tokens} tokens/response, {args.tokens_per_chunk} token(s)/chunk")
    for name, s in results.items():
        lat = s["latency_ms"]
        print(f"{name:13s} {s['rps']:8.0f} req/s  ok={s['ok']} errors={sum(s['errors'].values())}  "
              f"p50={lat['p50']:.1f}ms p99={lat['p99']:.1f}ms  sim_cpu_util={s['sim_cpu_util']:.2f}  "
              f"sim_cpu/req={s['sim_cpu_us_per_request']:.0f}us  capacity≈{s['capacity_rps']:.0f} req/s")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
