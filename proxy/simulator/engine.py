"""The simulated engine: latency model, request lifecycle, metrics and reconciliation stats.

Accounting (what ``/metrics`` and ``GET /sim/stats`` count):

* ``vllm:prompt_tokens_total`` grows by a request's prompt tokens when its first token
  is produced (after queue + prefill), ``vllm:generation_tokens_total`` by each token
  as it is produced, like vLLM, **including tokens of requests that are later aborted**.
* ``/sim/stats`` splits those totals exactly:
  ``prompt_tokens_total == prompt_tokens_reported + prompt_tokens_unreported`` and
  ``generation_tokens_total == completion_tokens_reported + generation_tokens_unreported``.
  *Reported* = the usage of requests that completed (returned in the JSON body, or in
  the final usage chunk of a stream; a stream that did not ask for usage still counts,
  it completed normally). *Unreported* = tokens of requests that ended without usage:
  client disconnects (also while queued; then nothing was counted), ``cut`` and
  ``error_chunk`` faults. With no aborts, the Prometheus counters equal the sum of usage.
* ``vllm:request_success_total{finished_reason}`` counts one per choice (vLLM runs each
  of ``n`` choices, and each prompt of a list, as its own engine request): ``stop`` /
  ``length`` when it finished, ``abort`` when the client went away (or a ``cut`` fault),
  ``error`` for the ``error_chunk`` fault.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Awaitable, Callable, Sequence

from .config import SimConfig
from .metrics import SimMetrics
from .scheduler import Scheduler

StepCallback = Callable[[int, int], Awaitable[None]]

_CONTROL_KEYS = ("fault", "dead", "health_delay_s", "ttft_ms", "prefill_ms_per_token", "itl_ms",
                 "load_factor", "jitter", "tokens_per_chunk", "response_tokens", "max_num_seqs")


class FaultStop(Exception):
    """Raised by a step callback to end a run early on purpose (cut / error_chunk)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Control:
    """Settings that ``POST /sim/control`` may change while the server runs."""

    fault: str | None = None
    dead: bool = False
    health_delay_s: float = 5.0
    ttft_ms: float = 0.0
    prefill_ms_per_token: float = 0.0
    itl_ms: float = 0.0
    load_factor: float = 1.0
    jitter: float = 0.0
    tokens_per_chunk: int = 1
    response_tokens: int = 16
    max_num_seqs: int = 256

    @classmethod
    def from_config(cls, cfg: SimConfig) -> "Control":
        return cls(**{k: getattr(cfg, k) for k in _CONTROL_KEYS})


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    errored: int = 0
    finished_reasons: dict[str, int] = field(default_factory=dict)
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prompt_tokens_reported: int = 0
    completion_tokens_reported: int = 0
    prompt_tokens_unreported: int = 0
    generation_tokens_unreported: int = 0
    faults: dict[str, int] = field(default_factory=dict)


class Engine:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.ctl = Control.from_config(cfg)
        self.sched = Scheduler(cfg.max_num_seqs, cfg.kv_cache_tokens)
        self.metrics = SimMetrics(cfg.served_names[0], self.sched, legacy=cfg.legacy_metric_names)
        self.stats = Stats()
        self.rng = random.Random(cfg.seed)

    # -- control ------------------------------------------------------------------
    def update_control(self, changes: dict) -> None:
        """Apply ``POST /sim/control`` changes (already validated by the caller)."""
        for key, value in changes.items():
            setattr(self.ctl, key, value)
            if key == "max_num_seqs":
                self.sched.resize(int(value))

    def stats_dict(self) -> dict:
        d = asdict(self.stats)
        d.update(running=self.sched.running, waiting=self.sched.waiting,
                 max_running_seen=self.sched.max_running_seen,
                 max_waiting_seen=self.sched.max_waiting_seen,
                 kv_cache_usage_perc=self.sched.kv_usage())
        return d

    def count_fault(self, name: str) -> None:
        self.stats.faults[name] = self.stats.faults.get(name, 0) + 1

    def _delay(self, ms: float) -> float:
        jitter = self.ctl.jitter
        if jitter:
            ms *= 1.0 + self.rng.uniform(-jitter, jitter)
        return ms / 1000.0

    def _finish(self, reason: str, count: int = 1) -> None:
        self.metrics.success[reason].inc(count)
        fr = self.stats.finished_reasons
        fr[reason] = fr.get(reason, 0) + count

    # -- a request ------------------------------------------------------------------
    async def execute(
        self,
        prompt_tokens: int,
        lengths: Sequence[int],
        finish_reasons: Sequence[str],
        on_step: StepCallback | None = None,
    ) -> str | None:
        """Run one request: queue, prefill, then decode ``lengths[i]`` tokens per choice.

        ``on_step(prev, pos)`` is awaited whenever tokens ``[prev, pos)`` of every choice
        are produced (the first step is the first token alone, then
        ``tokens_per_chunk`` at a time). Without a callback and without an ITL the
        decode is one step. Returns None when the request completed, or the reason a
        ``FaultStop`` gave. Cancellation (client gone) is accounted as an abort and
        re-raised.
        """
        ctl, metrics, stats, sched = self.ctl, self.metrics, self.stats, self.sched
        stats.requests += 1
        arrival = time.perf_counter()
        total_len = max(lengths, default=0)
        kv = prompt_tokens + sum(lengths)
        await_slot = sched.acquire(kv)
        try:
            await await_slot
        except asyncio.CancelledError:
            stats.aborted += 1
            self._finish("abort", max(1, len(lengths)))
            raise
        generated = 0
        prefilled = False
        pos = 0
        try:
            now = time.perf_counter()
            metrics.queue_time.observe(now - arrival)
            prefill_ms = ctl.ttft_ms + ctl.prefill_ms_per_token * prompt_tokens
            if prefill_ms > 0:
                await asyncio.sleep(self._delay(prefill_ms))
                now = time.perf_counter()
            metrics.prompt_tokens.inc(prompt_tokens)
            stats.prompt_tokens_total += prompt_tokens
            prefilled = True
            metrics.ttft.observe(now - arrival)
            itl_ms = ctl.itl_ms
            per_chunk = max(1, ctl.tokens_per_chunk)
            prev = 0
            last = now
            while pos < total_len:
                if pos == 0:
                    step = 1 if (on_step is not None or itl_ms > 0) else total_len
                else:
                    step = min(per_chunk, total_len - pos)
                    if itl_ms > 0:
                        await asyncio.sleep(self._delay(itl_ms * step * sched.load_factor(ctl.load_factor)))
                prev, pos = pos, pos + step
                new = 0
                firsts = 0
                for n in lengths:
                    if n > prev:
                        new += min(n, pos) - prev
                        firsts += prev == 0
                if new:
                    metrics.generation_tokens.inc(new)
                    stats.generation_tokens_total += new
                    generated += new
                    t = time.perf_counter()
                    if prev:
                        metrics.observe_itl((t - last) / step, new)
                    elif new > firsts:
                        metrics.observe_itl(0.0, new - firsts)
                    last = t
                if on_step is not None:
                    await on_step(prev, pos)
        except FaultStop as stop:
            self._end_early(stop.reason, lengths, finish_reasons, pos, prompt_tokens, prefilled, generated)
            return stop.reason
        except BaseException:
            self._end_early("abort", lengths, finish_reasons, pos, prompt_tokens, prefilled, generated)
            raise
        finally:
            sched.release(kv)
        for reason in finish_reasons:
            self._finish(reason)
        stats.completed += 1
        stats.prompt_tokens_reported += prompt_tokens
        stats.completion_tokens_reported += generated
        metrics.e2e.observe(time.perf_counter() - arrival)
        return None

    def _end_early(self, reason: str, lengths: Sequence[int], finish_reasons: Sequence[str], pos: int,
                   prompt_tokens: int, prefilled: bool, generated: int) -> None:
        stats = self.stats
        if reason == "error":
            stats.errored += 1
        else:
            stats.aborted += 1
        for n, fr in zip(lengths, finish_reasons):
            self._finish(fr if prefilled and n <= pos else reason)
        if not lengths:
            self._finish(reason)
        if prefilled:
            stats.prompt_tokens_unreported += prompt_tokens
        stats.generation_tokens_unreported += generated


CONTROL_KEYS = _CONTROL_KEYS
