"""`make run`: QwenHub embedded on one machine, with no setup.

Migrates the SQLite database, seeds the demo team (idempotent), starts the vLLM
simulator as the upstream, the gateway under uvicorn and the schedule, and prints
the URLs, logins and a demo key. Ctrl-C stops them all.

The schedule (settings.CELERY_BEAT_SCHEDULE: the monthly close, finalize, quota
warnings) runs in one more process, `python -m qwenhub.run schedule`: a Celery worker
with embedded beat on kombu's filesystem transport, whose messages and beat state live
under data/celery/, so a demo left running closes its month by itself with no Redis.
"""
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SCHEDULE_DIR = DATA_DIR / "celery"


def _wait_for(url: str, proc: subprocess.Popen, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[2]} exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {seconds:.0f} s")


def _mail_destination(settings) -> str:
    path = getattr(settings, "EMAIL_FILE_PATH", None)
    return f"written as files to {path}" if path else f"sent with {settings.EMAIL_BACKEND}"


def schedule() -> None:
    """A Celery worker with embedded beat on the filesystem broker: the same tasks, the same schedule.

    Needs no server: messages are files under data/celery/queue (one node, so the same folder
    is read and written); beat keeps its last run times in data/celery/beat-schedule. One
    process, tasks one at a time (SQLite has one writer anyway). Tasks run in this worker,
    not eagerly: CELERY_TASK_ALWAYS_EAGER is off here.
    """
    os.environ["CELERY_BROKER_URL"] = "filesystem://"
    os.environ["CELERY_TASK_ALWAYS_EAGER"] = "false"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "qwenhub.settings")
    queue, control = SCHEDULE_DIR / "queue", SCHEDULE_DIR / "control"
    for folder in (queue, control):
        folder.mkdir(parents=True, exist_ok=True)
    from qwenhub.celery import app

    app.conf.update(
        broker_transport_options={"data_folder_in": str(queue), "data_folder_out": str(queue),
                                  "control_folder": str(control)},
        # Nobody sends this worker remote-control commands; without them no reply queues pile up.
        worker_enable_remote_control=False,
    )
    app.worker_main(["worker", "--beat", "--schedule", str(SCHEDULE_DIR / "beat-schedule"), "--pool", "solo",
                     "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"])


def embedded_environment() -> None:
    """The embedded default reads no dotenv file: a .env beside manage.py configures production (compose)."""
    dotenv = Path(__file__).resolve().parent.parent / ".env"
    if os.environ.get("QWENHUB_ENV_FILE", str(dotenv)) and dotenv.exists():
        print(f"Note: {dotenv} is not read by `make run` (it configures docker compose); "
              "the embedded default needs no settings.")
    os.environ["QWENHUB_ENV_FILE"] = ""  # the subprocesses (simulator, gateway, schedule) inherit it


def main() -> None:
    embedded_environment()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "qwenhub.settings")
    import django
    from django.conf import settings
    from django.core.management import call_command

    django.setup()
    host = os.environ.get("QWENHUB_HOST", "127.0.0.1")
    port = os.environ.get("QWENHUB_PORT", "8000")
    sim = urllib.parse.urlsplit(settings.QWENHUB_SIMULATOR_URL)

    call_command("migrate", interactive=False, verbosity=0)
    call_command("demo")

    procs = []
    try:
        simulator = subprocess.Popen([
            sys.executable, "-m", "proxy.simulator", "--host", sim.hostname or "127.0.0.1",
            "--port", str(sim.port or 8001), "--model", "Qwen2.5-7B-Instruct",
            # A GPU-like pace so streaming is visible in the demo.
            "--ttft-ms", "80", "--itl-ms", "15", "--max-num-seqs", "16",
        ])
        procs.append(simulator)
        _wait_for(f"{sim.scheme}://{sim.netloc}/health", simulator)
        gateway = subprocess.Popen([
            sys.executable, "-m", "uvicorn", "qwenhub.asgi:application", "--host", host, "--port", port,
            "--no-access-log", "--lifespan", "on",
        ])
        procs.append(gateway)
        _wait_for(f"http://{host}:{port}/admin/login/", gateway)
        procs.append(subprocess.Popen([sys.executable, "-m", "qwenhub.run", "schedule"]))
        print(
            f"\nQwenHub is running (embedded: SQLite, no Redis, simulated vLLM at {settings.QWENHUB_SIMULATOR_URL}).\n"
            f"  OpenAI-compatible API: http://{host}:{port}/v1   (use the demo key above)\n"
            f"  Your account page:     http://{host}:{port}/   (sign in as alice, bob or demo-admin)\n"
            f"  Django admin:          http://{host}:{port}/admin/\n"
            f"  Schedule (close, finalize, quota warnings): a Celery worker with beat, broker in {SCHEDULE_DIR}\n"
            f"  E-mails (statements, quota warnings): {_mail_destination(settings)}\n"
            f"  Try: curl http://{host}:{port}/v1/chat/completions -H 'Authorization: Bearer <key>' "
            "-H 'Content-Type: application/json' "
            "-d '{\"model\": \"qwen2.5-7b-instruct\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    schedule() if sys.argv[1:] == ["schedule"] else main()
