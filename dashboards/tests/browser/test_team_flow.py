"""A team admin in a real browser, beside the member in another context: lowering a member's request
quota below what they used stops their next /v1 call with 429, and they read the change on their page;
a member is refused the team pages; no prompt text on any of the admin's pages."""
import re

import openai
import pytest
from playwright.sync_api import expect

from dashboards.tests.browser.test_member_flow import CANARY, ask, lab, member, reload_until, sign_in
from tenants.models import AuditEvent, Member, QuotaCounter
from tenants.services import api_key_issue, team_create

REASON = "the lab's GPU budget is spent for November"


def test_admin_lowers_a_quota_below_use_and_the_next_call_gets_429(new_page, live_site, upstream):
    team = lab()
    member(team, "boss", role=Member.Role.ADMIN)
    alice = member(team, "alice", request_quota=100)
    _, raw = api_key_issue(member=alice, label="alice-laptop")
    client = live_site.client(raw)
    for _ in range(3):
        ask(client, CANARY)

    you = new_page()
    sign_in(you, "alice")
    # a member has no team pages: no link, and 403 by URL
    expect(you.locator("header.top nav")).not_to_contain_text("Team")
    assert you.request.get("/team/").status == 403
    assert you.request.get(f"/team/members/{alice.pk}/").status == 403

    admin = new_page()
    sign_in(admin, "boss")
    admin.get_by_role("link", name="Team", exact=True).click()
    row = admin.locator("#members tr.member", has_text="alice")

    def three_of_a_hundred():
        expect(row.locator("td.num").first).to_have_text("3 / 100", timeout=500)

    reload_until(admin, "/team/", three_of_a_hundred)
    row.get_by_role("link", name="alice").click()
    expect(admin.get_by_role("heading", level=1)).to_have_text("alice")
    form = admin.locator("#limits-form")
    expect(form.get_by_label("Requests per month")).to_have_value("100")
    form.get_by_label("Requests per month").fill("2")
    form.get_by_label("Reason").fill(REASON)
    form.get_by_role("button", name="Save").click()
    expect(admin.get_by_role("status")).to_have_text("alice's limits were saved.")
    expect(admin.locator("#limits-form").get_by_label("Requests per month")).to_have_value("2")
    alice.refresh_from_db()
    counter = QuotaCounter.objects.get(member=alice)
    # a lowered quota exhausts the month, it does not undo what was used
    assert alice.request_quota == 2 and counter.requests_used == 3 and counter.request_limit == 3
    event = AuditEvent.objects.get(member=alice, kind=AuditEvent.Kind.MEMBER_UPDATED, reason=REASON)
    assert event.actor.username == "boss"

    with pytest.raises(openai.RateLimitError) as refused:
        ask(client, CANARY)
    assert refused.value.status_code == 429 and refused.value.code == "insufficient_quota"

    you.goto("/")
    expect(you.locator("#requests-used")).to_have_text("3")
    expect(you.locator("#requests-used + td")).to_have_text("3")
    expect(you.get_by_role("meter", name="requests")).to_have_attribute("aria-valuenow", "100")
    change = you.locator("#history tr.event", has_text=REASON)
    expect(change).to_have_count(1)
    expect(change).to_contain_text("boss")

    # the refused call is listed, newest first, and the status filter finds it alone
    rows = you.locator("#rows tr.request")

    def four_requests_listed():
        expect(rows).to_have_count(4, timeout=500)

    reload_until(you, "/requests/", four_requests_listed)
    expect(rows.first.locator("td.bad")).to_have_text("Rejected")
    expect(rows.nth(1).locator("td.ok")).to_have_count(1)
    you.get_by_label("Status").select_option("rejected")
    you.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(1)
    expect(you).to_have_url(re.compile(r"status=rejected"))

    admin.goto("/team/")
    expect(row.locator("td.num").first).to_have_text("3 / 3")
    for path in ["/team/", f"/team/members/{alice.pk}/", "/team/periods/", "/team/export.csv"]:
        response = admin.request.get(path)
        assert response.status == 200, path
        assert CANARY not in response.text(), path
    admin.goto(f"/team/members/{alice.pk}/")  # the screenshot

    # another team's admin: alice and her key are a 404, and her form cannot be posted to
    other = team_create(slug="other", name="Other Lab")
    member(other, "olga", role=Member.Role.ADMIN)
    stranger = new_page()
    sign_in(stranger, "olga")
    assert stranger.request.get(f"/team/members/{alice.pk}/").status == 404
    stranger.goto("/team/")
    expect(stranger.locator("#members")).not_to_contain_text("alice")
    csrf = next(c["value"] for c in stranger.context.cookies() if c["name"] == "csrftoken")
    posted = stranger.request.post(f"/team/members/{alice.pk}/limits/", headers={"X-CSRFToken": csrf},
                                   form={"request_quota": "1000", "weight": "1", "reason": "taking over"})
    assert posted.status == 404
    alice.refresh_from_db()
    assert alice.request_quota == 2
