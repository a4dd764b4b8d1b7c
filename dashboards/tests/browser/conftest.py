"""Browser tests: Playwright driving Debian's Chromium against QwenHub under uvicorn.

- `live_site`: `uvicorn qwenhub.asgi:application` in a subprocess (the gateway tests'
  GatewayProcess, so /v1 is served too) against the test database and Redis. Its e-mails
  go to files (`live_site.mails()`, `live_site.link(...)`); its public URL is
  LIVE_PUBLIC_URL, a name nothing resolves, so a test sees that a link is built on the
  setting and opens the link's path on `live_site.url`.
- `browser`: Chromium at /usr/bin/chromium (the Debian package; `.ci/run` installs it),
  never a downloaded one. Without it every test here is skipped, saying why.
- `page` / `new_page(**context_options)`: a fresh context (1280×800, en-US unless told);
  when the test ends, a PNG of each page's viewport (not the full page) goes to
  test-artifacts/<test>[-n].png.

For /v1: `simulator` (the vLLM stand-in, one per package) and `upstream` (it, registered in
the catalog for this test: the database is emptied after each one); `live_site.client(key)`
is the real `openai` SDK against the live site.

Data a test creates must be committed for the server to see it: use `transactional_db`
(the `site_db` fixture does) and the services. Every test here is marked `browser`
(`pytest -m "not browser"` leaves them out).

While Playwright runs, its event loop counts as running in this thread, and Django would
refuse ORM calls from the test ("async context"); the fixtures set DJANGO_ALLOW_ASYNC_UNSAFE
for this package's tests only and stop Playwright when they are done.
"""
import email
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from email import policy
from pathlib import Path

import openai
import pytest
from django.conf import global_settings

from proxy.gateway.tests.conftest import MODEL, ROOT, SERVED, GatewayProcess
from proxy.simulator.testing import start_simulator

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = ROOT / "test-artifacts"
VIEWPORT = {"width": 1280, "height": 800}
LIVE_PUBLIC_URL = "http://qwenhub.test"
HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives Chromium with Playwright (dashboards/tests/browser)")


def pytest_collection_modifyitems(config, items):
    missing = pytest.mark.skip(reason=f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install "
                                      "chromium`; .ci/run does) to run the browser tests")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.browser)
            if not CHROMIUM.exists():
                item.add_marker(missing)


@dataclass
class LiveSite:
    process: GatewayProcess
    mail_dir: Path

    @property
    def url(self) -> str:
        return self.process.url

    def client(self, key: str) -> openai.OpenAI:
        """The OpenAI SDK on this site's /v1, as a member's program would use it (no retries)."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=20)

    def mails(self) -> list[email.message.EmailMessage]:
        """Every message the server has sent, oldest first."""
        messages = []
        for path in sorted(self.mail_dir.glob("*.log"), key=lambda p: p.stat().st_mtime):
            for raw in path.read_text().split("-" * 79 + "\n"):
                if raw.strip():
                    messages.append(email.message_from_string(raw, policy=policy.default))
        return messages

    def link(self, pattern: str, to: str) -> str:
        """The path of the last link matching pattern (a regex of a path) in the text of mail to `to`."""
        for message in reversed(self.mails()):
            if to in message["To"]:
                body = message.get_body(preferencelist=("plain",)).get_content()
                match = re.search(re.escape(LIVE_PUBLIC_URL) + f"({pattern})", body)
                assert match, body
                return match.group(1)
        raise AssertionError(f"no mail to {to}")


@pytest.fixture(scope="package")
def _async_unsafe_allowed():
    before = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    yield
    if before is None:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
    else:
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = before


@pytest.fixture(scope="package")
def live_site(django_db_setup, tmp_path_factory):
    # The server runs with DEBUG off, as in production: WhiteNoise serves collected files.
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, check=True,
                   env={**os.environ, "SECRET_KEY": "test-only-not-secret", "DEBUG": "false"})
    mail_dir = tmp_path_factory.mktemp("mail")
    process = GatewayProcess(tmp_path_factory.mktemp("live"), EMAIL_URL=f"filemail:///{mail_dir}",
                             QWENHUB_PUBLIC_URL=LIVE_PUBLIC_URL, LOG_LEVEL="INFO")
    yield LiveSite(process=process, mail_dir=mail_dir)
    process.stop()


@pytest.fixture(scope="package")
def simulator():
    with start_simulator("--model", SERVED) as handle:
        yield handle


@pytest.fixture
def upstream(simulator, site_db):
    """The simulator in the catalog, serving MODEL (the gateway reads routes uncached in tests)."""
    from proxy.services import upstream_add

    return upstream_add(name="gpu0", base_url=simulator.base_url, served_name=SERVED, public_name=MODEL,
                        aliases=["qwen"], max_concurrency=8)


@pytest.fixture(scope="package")
def browser(_async_unsafe_allowed):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing")
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture
def site_db(transactional_db, settings):
    """Committed rows, with passwords hashed as the server (default settings) checks them."""
    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS


@pytest.fixture
def new_page(browser, live_site, site_db, request):
    contexts = []

    def make(**options):
        options = {"viewport": VIEWPORT, "locale": "en-US", "base_url": live_site.url, **options}
        context = browser.new_context(**options)
        context.set_default_timeout(15_000)
        contexts.append(context)
        return context.new_page()

    yield make
    ARTIFACTS.mkdir(exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    shots = [page for context in contexts for page in context.pages]
    for n, page in enumerate(shots):
        suffix = f"-{n + 1}" if len(shots) > 1 else ""
        try:
            page.screenshot(path=str(ARTIFACTS / f"{name}{suffix}.png"))
        except Exception:  # a page that crashed still lets the others be saved
            pass
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page):
    return new_page()
