"""The Simplified Chinese translation: complete, up to date with the code, and what pages and e-mails show.

The .po file is the source (committed); the .mo is compiled from it (`make messages`, and here
when it is missing or older, so that `pytest` alone works too).
"""
import re
import shutil
from collections import Counter
from datetime import date, datetime
from pathlib import Path

import pytest
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from django.conf import settings
from django.core.management import call_command
from django.utils.html import strip_tags
from django.utils.translation import trans_real

from billing.models import StatementEmail
from billing.money import format_money
from billing.services import period_statements_send
from billing.services.statements import statement_message
from billing.tests.conftest import SHANGHAI, finalized_month
from billing.tests.factories import usage
from tenants.models import Member
from tenants.tests.factories import TeamFactory, UserFactory

BASE_DIR = Path(settings.BASE_DIR)
PO = BASE_DIR / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po"
MO = PO.with_suffix(".mo")
# What `make translations` leaves out (the Makefile's makemessages line), and what is no source.
SKIPPED = (".venv", "bench", "tests", ".git", "locale", "__pycache__", "node_modules", "test-artifacts", "staticfiles",
           ".hypothesis", "*.sqlite3*")
PLACEHOLDER = re.compile(r"%\(\w+\)[sd]|%%|\{[a-z_]*(?:![rs])?\}")
ZH = {"HTTP_ACCEPT_LANGUAGE": "zh-CN,zh;q=0.9"}
# Words a Chinese page keeps in Latin letters: names, product and technical terms.
KEPT = re.compile(r"QwenHub|OpenAI SDK|Python|curl|Base URL|API|Token|GPU|KV|CSV|Django|Lab|alice|bob|carol"
                  r"|qwen[\w.-]*|YOUR_API_KEY")


def _catalog():
    with PO.open("rb") as f:
        return read_po(f, locale="zh_Hans")


def _ids(message) -> tuple[str, ...]:
    return (message.id,) if isinstance(message.id, str) else tuple(message.id)


def _strings(message) -> tuple[str, ...]:
    return (message.string,) if isinstance(message.string, str) else tuple(message.string)


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Compile the .mo like `make messages` when it is missing or older, and drop Django's cached catalogs."""
    if not MO.exists() or MO.stat().st_mtime < PO.stat().st_mtime:
        with MO.open("wb") as f:
            write_mo(f, _catalog())
        trans_real._translations.clear()
        trans_real._default = None
    yield


# --- the .po file -------------------------------------------------------------------------

def test_every_entry_is_translated_and_none_is_fuzzy():
    catalog = _catalog()
    assert not catalog.fuzzy and catalog.num_plurals == 1 and "nplurals=1" in catalog.plural_forms
    messages = [m for m in catalog if m.id]
    assert len(messages) > 300
    untranslated = [m.id for m in messages if not all(s.strip() for s in _strings(m))]
    fuzzy = [m.id for m in messages if m.fuzzy]
    one_form = [m.id for m in messages if len(_strings(m)) != 1]
    assert (untranslated, fuzzy, one_form) == ([], [], [])


def test_every_placeholder_of_a_msgid_is_in_its_msgstr():
    wrong = []
    for message in _catalog():
        if not message.id:
            continue
        # zh has one plural form: it names the count like the plural msgid does
        expected = Counter(PLACEHOLDER.findall(_ids(message)[-1]))
        for string in _strings(message):
            if Counter(PLACEHOLDER.findall(string)) != expected:
                wrong.append((message.id, string))
    assert wrong == []


def test_the_glossary_is_kept():
    strings = {m.id: m.string for m in _catalog() if isinstance(m.id, str) and m.id}
    assert strings["My account"] == "我的账户" and strings["Team"] == "团队"  # the browser tests read these
    assert (strings["Sign in"], strings["Sign out"], strings["API keys"]) == ("登录", "退出登录", "API 密钥")
    assert (strings["GPU health"], strings["time to first token"]) == ("GPU 状态", "首 Token 时延")
    assert (strings["Revoke"], strings["Suspend"], strings["Reactivate"]) == ("吊销", "停用", "重新启用")
    assert strings["Idle capacity"] == "闲置容量" and strings["Invoices"] == "账单"


def test_the_po_file_holds_exactly_what_makemessages_extracts(tmp_path, monkeypatch, settings):
    if not all(shutil.which(tool) for tool in ("xgettext", "msgmerge", "msguniq", "msgattrib")):
        pytest.skip("GNU gettext is not installed: makemessages cannot run here")
    # makemessages writes next to what it scans: run it on a copy, into a fresh locale directory
    source = tmp_path / "src"
    shutil.copytree(BASE_DIR, source, ignore=shutil.ignore_patterns(*SKIPPED))
    settings.LOCALE_PATHS = [tmp_path / "locale"]
    monkeypatch.chdir(source)
    call_command("makemessages", locale=["zh_Hans"], no_obsolete=True, verbosity=0)
    with (tmp_path / "locale" / "zh_Hans" / "LC_MESSAGES" / "django.po").open("rb") as f:
        extracted = {(m.context, _ids(m)) for m in read_po(f, locale="zh_Hans") if m.id}
    committed = {(m.context, _ids(m)) for m in _catalog() if m.id}
    assert sorted(extracted - committed, key=str) == []  # marked in the code, missing from the .po
    assert sorted(committed - extracted, key=str) == []  # obsolete: run `make translations`


# --- pages --------------------------------------------------------------------------------

@pytest.fixture
def lab(db):
    from billing.tests.factories import MemberJoinedFactory

    team = TeamFactory(slug="lab", name="Lab", monthly_cost="3000.00", timezone="Asia/Shanghai", currency="CNY")
    alice = MemberJoinedFactory(team=team, user=UserFactory(username="alice"), role=Member.Role.ADMIN)
    bob = MemberJoinedFactory(team=team, user=UserFactory(username="bob"))
    now = datetime.now(SHANGHAI)
    usage(bob, date(now.year, now.month, 1), prompt=100, completion=50, started_at=now)
    return team, alice, bob


def _headings(page: str) -> list[str]:
    """The text of headings, table headers, buttons, labels and navigation links."""
    parts = re.findall(r"<(h1|h2|h3|th|button|label|legend|summary|figcaption)\b[^>]*>(.*?)</\1>", page, re.S)
    parts += [("nav", m) for m in re.findall(r"<nav\b[^>]*>(.*?)</nav>", page, re.S)]
    return [" ".join(strip_tags(text).split()) for _, text in parts]


def _english_left(page: str) -> list[str]:
    return [text for text in _headings(page) if re.search(r"[A-Za-z]{3,}", KEPT.sub("", text))]


@pytest.mark.parametrize(("who", "url", "chinese", "english"), [
    ("bob", "/", ["我在 Lab 的账户", "我的账户", "快速开始", "我的账户变更记录", "API 密钥"],
     ["My account", "Quick start", "API keys"]),
    ("alice", "/team/", ["本月成员", "GPU 状态", "账期与账单", "团队"], ["Members this month", "GPU health"]),
    ("bob", "/requests/", ["我的请求", "首 Token 时延（毫秒）", "成功"], ["My requests", "first token"]),
    ("bob", "/invoices/", ["我的账单", "还没有账单"], ["My invoices"]),
    (None, "/accounts/login/", ["登录 QwenHub", "用户名", "密码", "忘记密码？"], ["Sign in", "Username", "Password"]),
])
def test_pages_read_in_chinese_when_the_browser_asks_for_it(client, lab, who, url, chinese, english):
    team, alice, bob = lab
    if who:
        client.force_login({"alice": alice, "bob": bob}[who].user)
    response = client.get(url, **ZH)
    page = response.content.decode()
    assert response.status_code == 200 and '<html lang="zh-hans">' in page
    assert [text for text in chinese if text not in page] == []
    assert [text for text in english if text in strip_tags(page)] == []
    assert _english_left(page) == []


def test_the_same_page_stays_english_without_a_preference(client, lab):
    _, _, bob = lab
    client.force_login(bob.user)
    page = client.get("/").content.decode()
    assert '<html lang="en">' in page and "Quick start" in page and "快速开始" not in page
    assert "Quick start" in _english_left(page)  # the check of the Chinese pages sees English when it is there


def test_the_language_switcher_posts_to_setlang_and_sticks(client, lab):
    _, _, bob = lab
    client.force_login(bob.user)
    page = client.get("/requests/").content.decode()
    assert re.search(r'<form method="post" action="/i18n/setlang/"', page)
    assert '<option value="zh-hans">简体中文</option>' in page
    response = client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/requests/"})
    assert response.status_code == 302 and response["Location"] == "/requests/"
    assert client.cookies[settings.LANGUAGE_COOKIE_NAME].value == "zh-hans"
    # later pages follow the choice, without any Accept-Language, over the browser's own
    assert "我的请求" in client.get("/requests/").content.decode()
    assert "快速开始" in client.get("/", HTTP_ACCEPT_LANGUAGE="en").content.decode()
    client.post("/i18n/setlang/", {"language": "en", "next": "/"})
    assert "Quick start" in client.get("/", **ZH).content.decode()


def test_a_form_error_and_a_message_are_chinese(client, lab):
    _, _, bob = lab
    client.force_login(bob.user)
    page = client.get("/requests/?since=2026-11-05&until=2026-11-01", **ZH).content.decode()
    assert "截止日期不能早于起始日期。" in page
    response = client.post("/accounts/login/", {"username": "bob", "password": "wrong"}, **ZH)
    assert "用户名或密码不正确。" in response.content.decode()


# --- e-mails ------------------------------------------------------------------------------

@pytest.mark.django_db
def test_a_statement_in_chinese_with_money_formatted_by_babel(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.LANGUAGE_CODE = "zh-hans"
    period, members = finalized_month()
    period_statements_send(period=period)
    invoice = period.invoices.get(member=members["alice"])
    message = statement_message(email=StatementEmail.objects.get(invoice=invoice), to=["alice@example.com"])
    amount = format_money(invoice.amount, "CNY", "zh_Hans")
    assert amount.startswith("¥") and not amount.startswith("CN¥")  # Babel's zh symbol, not the English one
    assert message.subject.startswith(f"你的 QwenHub 对账单 {invoice.number}") and message.subject.endswith(amount)
    assert f"应付金额: {amount}" in message.body and "alice，你好：" in message.body
    assert "各模型用量" in message.body and "Amount due" not in message.body and "Usage by model" not in message.body
    html = message.alternatives[0][0]
    assert "应付金额" in html and amount in html and "Amount due" not in html
