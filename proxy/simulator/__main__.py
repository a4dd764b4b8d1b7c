"""``python -m proxy.simulator --port 8001 --model Qwen2.5-7B-Instruct [options]``."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading

from .app import serve
from .config import parse_args

READY_PREFIX = "proxy.simulator listening on "


def _watch_parent() -> None:
    """Exit when stdin reaches EOF: the parent that holds the pipe has gone."""
    try:
        while os.read(0, 65536):  # raw fd: no buffered-reader lock to trip over at exit
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_stdin_eof = "--exit-on-stdin-eof" in argv
    if exit_on_stdin_eof:
        argv.remove("--exit-on-stdin-eof")
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if exit_on_stdin_eof:
        threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(port: int) -> None:
            print(f"{READY_PREFIX}http://{cfg.host}:{port}", flush=True)

        await serve(cfg, stop, ready)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is pinned in requirements.txt
        asyncio.run(run())
    else:
        uvloop.run(run())


if __name__ == "__main__":
    main()
