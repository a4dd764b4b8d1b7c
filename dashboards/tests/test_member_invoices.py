"""The member's invoices: only issued ones, only theirs, each as a printable statement (the e-mail links here)."""
import re
from datetime import date, datetime
from decimal import Decimal

import pytest
from django.utils.html import escape

from billing.models import Invoice
from billing.selectors import invoice_detail
from billing.services import period_close
from billing.services.statements import statement_invoice_url
from billing.tests.conftest import PUBLIC_URL, SHANGHAI, finalized_month
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.tests.factories import TeamFactory

pytestmark = pytest.mark.django_db
OCT = date(2026, 10, 1)


@pytest.fixture
def month():
    period, members = finalized_month()
    invoices = {name: Invoice.objects.get(period=period, member=m) for name, m in members.items()}
    return period, members, invoices


def test_the_list_shows_my_issued_invoices_only(client, month):
    period, members, invoices = month
    # a later month closed but not finalized: its draft may still change and is not shown
    team = period.team
    usage(members["alice"], date(2026, 12, 1), started_at=datetime(2026, 12, 3, tzinfo=SHANGHAI))
    draft_period = period_close(team=team, start=date(2026, 12, 1), now=datetime(2027, 1, 1, 0, 10, tzinfo=SHANGHAI),
                                wait_seconds=0)
    draft = Invoice.objects.get(period=draft_period, member=members["alice"])
    client.force_login(members["alice"].user)
    page = client.get("/invoices/").content.decode()
    rows = re.findall(r'<tr class="invoice">(.*?)</tr>', page, re.S)
    assert len(rows) == 1 and invoices["alice"].number in rows[0] and "2026-11" in rows[0]
    assert invoices["bob"].number not in page
    assert client.get(f"/invoices/{draft.pk}/").status_code == 404


def test_statement_shows_lines_share_effective_price_and_policy(client, month):
    period, members, invoices = month
    alice = invoices["alice"]
    detail = invoice_detail(invoice=alice)
    client.force_login(members["alice"].user)
    response = client.get(f"/invoices/{alice.pk}/")
    page = response.content.decode()
    assert response.status_code == 200 and alice.number in page
    lines = re.findall(r'<tr class="line">(.*?)</tr>', page, re.S)
    assert [re.search(r"<td>(.*?)</td>", line).group(1) for line in lines] == ["qwen2.5-72b", "qwen2.5-7b-instruct"]
    assert "3,000" in lines[1] and "1,500" in lines[1]  # prompt and completion tokens of the 7B model
    share = re.search(r'id="share">(.*?)<', page).group(1)
    assert share == f"{(alice.share * 100).quantize(Decimal('0.01'))}%"
    assert detail.effective_price is not None
    assert re.search(r'id="effective-price">(.*?)<', page).group(1).startswith("CN¥")
    assert escape(period.explanation) in re.search(r'<p id="policy">(.*?)</p>', page, re.S).group(1)
    assert 'media="print"' in page
    # no other member's figures
    assert invoices["bob"].number not in page and "bob" not in page


def test_another_members_invoice_is_a_404(client, month):
    _, members, invoices = month
    client.force_login(members["bob"].user)
    assert client.get(f"/invoices/{invoices['alice'].pk}/").status_code == 404
    assert client.get("/invoices/99999999/").status_code == 404
    assert client.get(f"/invoices/{invoices['bob'].pk}/").status_code == 200


def test_a_suspended_membership_has_no_statement_page(client, month):
    _, members, invoices = month
    bob = members["bob"]
    bob.is_active = False
    bob.save(update_fields=["is_active"])
    client.force_login(bob.user)
    assert client.get(f"/invoices/{invoices['bob'].pk}/").status_code == 403


def test_the_emailed_link_opens_the_statement_whichever_team_the_switcher_shows(client, month, settings):
    settings.QWENHUB_PUBLIC_URL = PUBLIC_URL
    _, members, invoices = month
    alice = members["alice"]
    # alice also belongs to a team shown first (slug "aaa"): the e-mail's link still opens the lab's invoice
    MemberJoinedFactory(team=TeamFactory(slug="aaa", name="Another team"), user=alice.user)
    url = statement_invoice_url(invoice=invoices["alice"])
    assert url == f"{PUBLIC_URL}/invoices/{invoices['alice'].pk}/"
    client.force_login(alice.user)
    page = client.get(url.removeprefix(PUBLIC_URL)).content.decode()
    assert invoices["alice"].number in page and "<td>Lab</td>" in page
    # and the list stays the shown team's (no invoices there)
    assert invoices["alice"].number not in client.get("/invoices/").content.decode()


def test_get_only_pages_refuse_post(client, month):
    _, members, invoices = month
    client.force_login(members["alice"].user)
    assert client.post("/invoices/").status_code == 405
    assert client.post(f"/invoices/{invoices['alice'].pk}/").status_code == 405


def test_invoice_pages_query_counts(client, month, django_assert_num_queries):
    _, members, invoices = month
    client.force_login(members["alice"].user)
    with django_assert_num_queries(4):  # session, user, memberships, invoices with their period
        client.get("/invoices/")
    # session, user, memberships, the invoice's owner, the invoice with period and member, its lines
    with django_assert_num_queries(6):
        client.get(f"/invoices/{invoices['alice'].pk}/")
