"""What the soak reads while it runs: a private redis-server, its keys and TTLs, a process tree's RSS."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

from bench.procs import free_port


class RedisServer:
    """A private redis-server on a free loopback port, no persistence; stopped with the other processes."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not on PATH")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="qh-soak-redis-")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self._dir, "--loglevel", "warning"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        import redis

        self.client = redis.Redis(port=self.port, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the private redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self._dir, ignore_errors=True)


def redis_keys(client) -> tuple[int, list[str]]:
    """(number of keys, the keys without a TTL) of the client's database."""
    keys = list(client.scan_iter(count=1000))
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.ttl(k)
    ttls = pipe.execute() if keys else []
    return len(keys), sorted(k.decode(errors="replace") for k, t in zip(keys, ttls) if t == -1)


def key_shapes(keys) -> dict[str, int]:
    """How many keys of each shape (digits replaced by #), e.g. {"ql:r:#": 198}."""
    import re

    out: dict[str, int] = {}
    for k in keys:
        shape = re.sub(r"\d+", "#", k if isinstance(k, str) else k.decode(errors="replace"))
        out[shape] = out.get(shape, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def process_tree_rss_mb(pid: int) -> tuple[float, int]:
    """RSS of a process and all its descendants (MB, from /proc), and how many processes that is."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in tree:
                tree.add(child)
                frontier.append(child)
    kb = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/status") as f:
                kb += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return kb / 1024, len(tree)


