"""Start the simulator for tests: as a subprocess (default) or in a thread of this process.

    from proxy.simulator.testing import start_simulator

    with start_simulator("--max-num-seqs", "2", "--itl-ms", "20") as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="x")   # http://127.0.0.1:PORT/v1
        ...
        sim.stats()                # GET /sim/stats as a dict
        sim.control(fault="hang")  # POST /sim/control
        sim.metrics()              # {"vllm:prompt_tokens_total": 42.0, ...} (label-less sums)

The subprocess binds port 0 and reports the port it got, so there is no free-port race.
It exits when ``stop()``/``kill()`` is called, when the handle is garbage-collected or
the interpreter exits, and, even if this process is SIGKILLed, when its stdin pipe
closes. ``stop()`` makes every later connection attempt fail with "connection refused".
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Any

__all__ = ["SimulatorHandle", "start_simulator", "start_simulator_in_thread", "parse_metrics"]

READY_PREFIX = "proxy.simulator listening on "
_REPO_ROOT = Path(__file__).resolve().parents[2]
_live: "weakref.WeakSet[SimulatorHandle]" = weakref.WeakSet()


def parse_metrics(text: str) -> dict[str, float]:
    """Sum Prometheus samples by name (labels dropped), e.g. ``vllm:prompt_tokens_total``.

    Samples with a ``finished_reason`` label are also kept under
    ``name{finished_reason="..."}`` so the abort counter can be read directly.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0]
        v = float(value)
        out[name] = out.get(name, 0.0) + v
        if 'finished_reason="' in head:
            reason = head.split('finished_reason="', 1)[1].split('"', 1)[0]
            key = f'{name}{{finished_reason="{reason}"}}'
            out[key] = out.get(key, 0.0) + v
    return out


class SimulatorHandle:
    """A running simulator: ``base_url`` (…/v1), ``root_url``, ``port``, helpers, stop/kill."""

    def __init__(self, host: str, port: int, process: subprocess.Popen | None = None,
                 thread: threading.Thread | None = None, stopper: Any = None, app: Any = None) -> None:
        self.host, self.port = host, port
        self.root_url = f"http://{host}:{port}"
        self.base_url = f"{self.root_url}/v1"
        self.process = process
        self._thread, self._stopper = thread, stopper
        self.app = app  # in-thread only: the aiohttp app (app["simulator"].engine ...)
        _live.add(self)

    # -- HTTP helpers (stdlib only, so they work from any test) ----------------------------
    def _call(self, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.root_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def stats(self) -> dict[str, Any]:
        return json.loads(self._call("GET", "/sim/stats")[1])

    def control(self, **changes: Any) -> dict[str, Any]:
        """POST /sim/control, e.g. ``control(fault="cut")``, ``control(fault=None, dead=False)``."""
        status, body = self._call("POST", "/sim/control", changes)
        if status != 200:
            raise ValueError(body.decode())
        return json.loads(body)

    def metrics_text(self) -> str:
        return self._call("GET", "/metrics")[1].decode()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text())

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return self._call("GET", "/health", timeout=timeout)[0] == 200
        except OSError:
            return False

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Shut down gracefully (SIGTERM), killing after ``timeout``; idempotent."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout)
            self._close_pipes()
        elif self._thread is not None and self._thread.is_alive():
            self._stopper()
            self._thread.join(timeout)

    def kill(self) -> None:
        """SIGKILL the subprocess (an abrupt crash); in-thread servers just stop."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)
            self._close_pipes()
        else:
            self.stop()

    def _close_pipes(self) -> None:
        for f in (self.process.stdin, self.process.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass

    def __enter__(self) -> "SimulatorHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __del__(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.kill()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"<SimulatorHandle {self.root_url} alive={self.alive}>"


def _wait_healthy(handle: SimulatorHandle, deadline: float) -> None:
    # /version, not /health: it answers at once even with --dead or the slow_health fault
    while time.monotonic() < deadline:
        try:
            if handle._call("GET", "/version", timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.02)
    handle.kill()
    raise RuntimeError(f"simulator at {handle.root_url} did not answer")


def start_simulator(*args: str, host: str = "127.0.0.1", startup_timeout: float = 10.0,
                    env: dict[str, str] | None = None, python: str | None = None,
                    wait_healthy: bool = True, prefix: list[str] | tuple[str, ...] = ()) -> SimulatorHandle:
    """Start ``python -m proxy.simulator *args`` on a free port and wait until it answers.

    ``args`` are CLI options (``"--max-num-seqs", "2"``); ``--host``/``--port`` are set
    here. Readiness is checked on ``/version`` so ``--dead`` and ``slow_health`` work.
    ``prefix`` is prepended to the command, e.g. ``("taskset", "-c", "0")``.
    """
    cmd = [*prefix, python or sys.executable, "-m", "proxy.simulator", *args, "--host", host, "--port", "0",
           "--exit-on-stdin-eof"]
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), full_env.get("PYTHONPATH")]))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=full_env, cwd=str(_REPO_ROOT))
    deadline = time.monotonic() + startup_timeout
    port: list[int] = []
    reader_done = threading.Event()

    def read_stdout() -> None:
        # find the ready line, then keep draining so the child never blocks on a full pipe
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").strip()
            if not port and line.startswith(READY_PREFIX):
                port.append(int(line.rsplit(":", 1)[1]))
                reader_done.set()
        reader_done.set()

    threading.Thread(target=read_stdout, name="simulator-stdout", daemon=True).start()
    reader_done.wait(max(0.0, deadline - time.monotonic()))
    if not port:
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"simulator did not start (exit code {proc.poll()}); command: {' '.join(cmd)}")
    handle = SimulatorHandle(host, port[0], process=proc)
    if wait_healthy:
        _wait_healthy(handle, deadline)
    return handle


def start_simulator_in_thread(*args: str, host: str = "127.0.0.1", startup_timeout: float = 10.0) -> SimulatorHandle:
    """Run the simulator on its own event loop in a daemon thread of this process.

    Faster to start than a subprocess and gives access to ``handle.app["simulator"]``
    (engine, stats). ``kill()`` is the same as ``stop()`` here.
    """
    import asyncio

    from .app import build_app, serve
    from .config import parse_args

    cfg = parse_args([*args, "--host", host, "--port", "0"])
    app = build_app(cfg)
    ready = threading.Event()
    state: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        state["loop"] = loop
        stop = asyncio.Event()
        state["stop"] = stop

        def on_ready(p: int) -> None:
            state["port"] = p
            ready.set()

        try:
            loop.run_until_complete(serve(cfg, stop, on_ready, app=app))
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            state["error"] = exc
        finally:
            ready.set()
            loop.close()

    thread = threading.Thread(target=run, name="simulator", daemon=True)
    thread.start()
    ready.wait(startup_timeout)
    if "port" not in state:
        raise RuntimeError(f"simulator thread did not start: {state.get('error')!r}")

    def stopper() -> None:
        loop = state["loop"]
        if not loop.is_closed():
            loop.call_soon_threadsafe(state["stop"].set)

    handle = SimulatorHandle(host, state["port"], thread=thread, stopper=stopper, app=app)
    _wait_healthy(handle, time.monotonic() + startup_timeout)
    return handle


@atexit.register
def _stop_all() -> None:
    for handle in list(_live):
        try:
            handle.kill()
        except Exception:  # noqa: BLE001
            pass
