"""A private PostgreSQL cluster and a private redis-server on free ports, for tests that stop them.

The shared servers on 5432/6379 are never stopped by a test; these are, and restarted on the
same port. Both are context managers that always stop their server and remove its files,
whatever the test did:

    with private_redis() as redis:          # redis.url, redis.stop(), redis.start(), redis.cli("KEYS", "*")
        ...
    with private_postgres() as pg:          # pg.url("qh"), pg.stop(), pg.start(), pg.createdb("qh")
        ...

PostgreSQL refuses to run as root: when the tests run as root (CI does), initdb and pg_ctl run
as the `postgres` user (runuser), in a directory under /tmp that belongs to it, with the
socket in that directory too. Fails (never skips) if the programs are missing.
"""
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import psycopg

from proxy.gateway.tests.conftest import free_port


def _program(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None:
        raise RuntimeError(f"{name} is needed for these tests and is not installed")
    return found


def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class PrivateRedis:
    """redis-server on a free port, without persistence: a restart starts it empty."""

    def __init__(self) -> None:
        self.server = _program("redis-server")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def cli(self, *args: str) -> str:
        done = subprocess.run([_program("redis-cli"), "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=5)
        return done.stdout.strip()

    def _pings(self) -> bool:
        try:
            return self.cli("ping") == "PONG"
        except subprocess.TimeoutExpired:
            return False

    def start(self) -> None:
        self.proc = subprocess.Popen([self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _until(self._pings, 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def private_redis():
    redis = PrivateRedis()
    try:
        redis.start()
        yield redis
    finally:
        redis.stop()


class PrivatePostgres:
    """A PostgreSQL cluster of its own (trust auth, user postgres, fsync off) on a free port."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _program("initdb"), _program("pg_ctl")
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="qh-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self._as = []
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        os.chmod(self.root, 0o700)

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        done = subprocess.run([*self._as, *cmd], capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}{self.log_text()[-2000:]}")

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def init(self) -> None:
        self._run(self.initdb, "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync",
                  "--no-instructions")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run(self.pg_ctl, "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: roll back open transactions, close every connection)."""
        self._run(self.pg_ctl, "-D", self.data, "-m", mode, "-w", "-t", "30", "stop")

    @property
    def running(self) -> bool:
        return os.path.exists(os.path.join(self.data, "postmaster.pid"))

    def url(self, dbname: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, autocommit=True,
                               connect_timeout=3)

    def createdb(self, dbname: str) -> None:
        with self.connect() as admin:
            admin.execute(f'CREATE DATABASE "{dbname}"')

    def destroy(self) -> None:
        if self.running:
            try:
                self.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(self.data, "postmaster.pid")) as f:
                        os.kill(int(f.readline()), 9)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_postgres():
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.destroy()
