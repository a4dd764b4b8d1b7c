"""A member in a real browser: a key made on /keys/, used with the OpenAI SDK on /v1, then seen on
/requests/ and in the quota bars of /; the month's invoice once it is closed; the Chinese interface;
and no prompt text, nor anything of another member's, on any of their pages."""
import re
import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from django.utils import translation
from playwright.sync_api import expect

from billing.models import Invoice
from billing.services import period_close, period_finalize
from billing.tests.factories import usage
from dashboards.templatetags.qwenhub import money
from proxy.gateway.tests.conftest import MODEL
from tenants.models import ApiKey, Member
from tenants.periods import period_start_for
from tenants.services import api_key_issue, member_add, team_create

PASSWORD = "browser-pass-123"
CANARY = "canary-prompt-7f3a1c: the secret recipe is saffron"
OTHER_CANARY = "other-canary-55d0e2: zebedee's private question"
SHANGHAI = "Asia/Shanghai"
SIGNED_IN = re.compile(r"^http://127\.0\.0\.1:\d+/$")  # the member's overview
MEMBER_PAGES = ["/", "/keys/", "/requests/", "/invoices/"]


def lab(**kwargs):
    return team_create(slug="lab", name="The Lab", timezone_name=SHANGHAI, currency="CNY",
                       monthly_cost="3000", **kwargs)


def member(team, username, role=Member.Role.MEMBER, **quotas):
    return member_add(team=team, username=username, email=f"{username}@example.org", password=PASSWORD,
                      role=role, **quotas)


def sign_in(page, username):
    """By the fields' names, not their labels: this works in any language."""
    page.goto("/accounts/login/")
    page.locator("input[name=username]").fill(username)
    page.locator("input[name=password]").fill(PASSWORD)
    page.locator("form.stack button[type=submit]").click()
    expect(page).to_have_url(SIGNED_IN)


def ask(client, prompt, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=8, **kwargs)


def reload_until(page, path, check, timeout=10.0):
    """Open path until check() (bounded expects) passes: usage is written just after the response."""
    deadline = time.monotonic() + timeout
    while True:
        page.goto(path)
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def html_of(page, path):
    if path.endswith(".csv"):
        response = page.request.get(path)
        assert response.status == 200, path
        return response.text()
    response = page.goto(path)
    assert response.status == 200, path
    return page.content()


def test_member_makes_a_key_calls_v1_and_sees_the_request(new_page, live_site, upstream):
    team = lab()
    member(team, "alice", request_quota=10)
    zebedee = member(team, "zebedee")
    _, other_key = api_key_issue(member=zebedee, label="zebedee-laptop")
    ask(live_site.client(other_key), OTHER_CANARY)

    page = new_page()
    sign_in(page, "alice")
    requests_meter = page.get_by_role("meter", name="requests")
    expect(page.locator("#requests-used")).to_have_text("0")
    expect(requests_meter).to_have_attribute("aria-valuenow", "0")

    page.get_by_role("link", name="API keys").first.click()
    page.get_by_label("Label").fill("alice-laptop")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Your new API key")
    raw = page.locator("#raw-key").inner_text().strip()
    key = ApiKey.objects.get(label="alice-laptop")
    assert raw.startswith(key.prefix) and len(raw) > len(key.prefix) + 16
    assert key.member.user.username == "alice"

    # Shown once: the list has the prefix, never the key.
    page.goto("/keys/")
    expect(page.locator("#keys tr.key")).to_have_count(1)
    expect(page.locator("#keys tr.key")).to_contain_text(key.prefix)
    assert raw not in page.content()

    client = live_site.client(raw)
    reply = ask(client, CANARY)
    assert reply.choices[0].message.content and reply.usage.total_tokens > 0
    chunks = list(ask(client, CANARY + " (streamed)", stream=True, stream_options={"include_usage": True}))
    assert chunks and chunks[-1].usage.total_tokens > 0

    rows = page.locator("#rows tr.request")

    def two_requests_listed():
        expect(rows).to_have_count(2, timeout=500)

    reload_until(page, "/requests/", two_requests_listed)
    for n in range(2):
        expect(rows.nth(n)).to_contain_text(MODEL)
        expect(rows.nth(n)).to_contain_text(key.prefix)
        expect(rows.nth(n).locator("td.ok")).to_have_count(1)

    def quota_moved():
        expect(page.locator("#requests-used")).to_have_text("2", timeout=500)

    reload_until(page, "/", quota_moved)
    expect(requests_meter).to_have_attribute("aria-valuenow", "20")
    expect(page.locator("#requests-used + td")).to_have_text("10")
    assert int(page.locator("#tokens-used").inner_text().replace(",", "")) > 0
    expect(page.locator("#keys")).to_contain_text(key.prefix)

    # No prompt, and nothing of zebedee's, on any of alice's pages (nor the CSV, nor the server's log).
    for path in [*MEMBER_PAGES, "/requests.csv"]:
        text = html_of(page, path)
        for secret in (CANARY, "secret recipe", OTHER_CANARY, "zebedee"):
            assert secret not in text, (path, secret)
    assert CANARY not in live_site.process.log_text() and OTHER_CANARY not in live_site.process.log_text()
    page.goto("/")  # the screenshot


def previous_month(tz_name):
    start = period_start_for(tz_name)
    return (start - timedelta(days=1)).replace(day=1)


def test_invoice_after_the_month_is_closed(new_page, live_site):
    team = lab()
    boss = member(team, "boss", role=Member.Role.ADMIN)
    alice = member(team, "alice")
    Member.objects.filter(team=team).update(created_at=datetime(2025, 1, 1, tzinfo=ZoneInfo("UTC")))
    month = previous_month(SHANGHAI)
    usage(alice, month, prompt=3000, completion=1000)
    usage(boss, month, prompt=1000, completion=0)
    period = period_finalize(period=period_close(team=team, start=month, wait_seconds=0))
    mine = Invoice.objects.get(period=period, member=alice)
    theirs = Invoice.objects.get(period=period, member=boss)
    assert mine.number and theirs.number and mine.amount > 0
    with translation.override("en"):
        amount = money(mine.amount, "CNY")
        total = money(mine.amount + theirs.amount, "CNY")

    page = new_page()
    sign_in(page, "alice")
    page.get_by_role("link", name="Invoices").click()
    expect(page).to_have_url(live_site.url + "/invoices/")
    rows = page.locator("tr.invoice")
    expect(rows).to_have_count(1)
    expect(rows).to_contain_text(mine.number)
    expect(rows).to_contain_text(month.strftime("%Y-%m"))
    expect(rows).to_contain_text(amount)
    assert theirs.number not in page.content()

    rows.get_by_role("link", name=mine.number).click()
    expect(page).to_have_url(live_site.url + f"/invoices/{mine.pk}/")
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Invoice {mine.number}")
    expect(page.locator("#amount")).to_have_text(amount)
    expect(page.locator("#statement")).to_contain_text(month.strftime("%B %Y"))
    expect(page.locator("#statement")).to_contain_text("alice")
    # boss's invoice is a 404 for alice, the statement of a team admin included
    assert page.request.get(f"/invoices/{theirs.pk}/").status == 404

    admin = new_page()
    sign_in(admin, "boss")
    admin.get_by_role("link", name="Team", exact=True).click()
    expect(admin).to_have_url(live_site.url + "/team/")
    admin.get_by_role("link", name="Periods and invoices").click()
    period_row = admin.locator("tr.period")
    expect(period_row).to_have_count(1)
    expect(period_row).to_contain_text(month.strftime("%Y-%m"))
    expect(period_row).to_contain_text("Finalized")
    expect(period_row.locator("td.num").nth(1)).to_have_text("2")
    expect(period_row.locator("td.num").nth(2)).to_have_text(total)


def test_the_navigation_in_chinese(new_page):
    team = lab()
    member(team, "alice")
    member(team, "boss", role=Member.Role.ADMIN)

    page = new_page(locale="zh-CN")
    sign_in(page, "alice")
    expect(page.locator("html")).to_have_attribute("lang", "zh-hans")
    nav = page.locator("header.top nav")
    expect(nav).to_contain_text("我的账户", timeout=3_000)
    expect(nav).not_to_contain_text("团队", timeout=3_000)

    admin = new_page(locale="zh-CN")
    sign_in(admin, "boss")
    expect(admin.locator("header.top nav")).to_contain_text("我的账户", timeout=3_000)
    expect(admin.locator("header.top nav")).to_contain_text("团队", timeout=3_000)
