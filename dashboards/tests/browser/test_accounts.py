"""Sign-in, the failed-sign-in limit, invitations and the language, in a real browser."""
import re

from playwright.sync_api import expect

from tenants.models import Member
from tenants.services import member_add, team_create

PASSWORD = "browser-pass-123"


def make_member(username="alice", role=Member.Role.MEMBER, team=None):
    team = team or team_create(slug="lab", name="The Lab")
    return member_add(team=team, username=username, email=f"{username}@example.org", password=PASSWORD, role=role)


def sign_in(page, username, password=PASSWORD):
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    with page.expect_response(re.compile(r"/accounts/login/")) as response:
        page.get_by_role("button", name="Sign in").click()
    return response.value


def test_member_signs_in_and_out(page, live_site):
    make_member()
    sign_in(page, "alice")
    expect(page).to_have_url(live_site.url + "/")
    expect(page.get_by_role("heading", level=1)).to_have_text("My account in The Lab")

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/accounts/login/"))
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/accounts/login/\?next=/$"))


def test_five_wrong_passwords_then_the_limit(page):
    make_member()
    for _ in range(5):
        response = sign_in(page, "alice", "wrong-password")
        assert response.status == 200
        expect(page.get_by_role("alert")).to_have_text("Your username and password didn't match.")
    response = sign_in(page, "alice")  # the right password, too late
    assert response.status == 429
    expect(page.locator("#login-limited")).to_contain_text("Too many failed sign-ins")
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/accounts/login/"))  # not signed in


def test_admin_invites_and_the_member_sets_a_password(new_page, live_site):
    boss = make_member("boss", role=Member.Role.ADMIN)
    admin = new_page()
    sign_in(admin, "boss")
    admin.goto("/accounts/invite/")
    admin.get_by_label("E-mail address").fill("newbie@example.org")
    admin.get_by_label("Username").fill("newbie")
    admin.get_by_label("Monthly request quota").fill("100")
    admin.get_by_role("button", name="Send the invitation").click()
    expect(admin.get_by_role("status")).to_have_text("Invitation sent to newbie@example.org.")
    assert Member.objects.get(user__username="newbie").team_id == boss.team_id

    path = live_site.link(r"/accounts/invite/[^/\s]+/[^/\s]+/", to="newbie@example.org")
    newbie = new_page()
    newbie.goto(path)
    expect(newbie.get_by_role("heading", level=1)).to_have_text("Welcome to QwenHub")
    newbie.locator("input[name=new_password1]").fill("my-own-password-9")
    newbie.locator("input[name=new_password2]").fill("my-own-password-9")
    newbie.get_by_role("button", name="Set password and sign in").click()
    expect(newbie).to_have_url(live_site.url + "/")
    expect(newbie.get_by_role("heading", level=1)).to_have_text("My account in The Lab")
    expect(newbie.get_by_role("status")).to_contain_text("your password is set")

    # The link worked once.
    again = new_page()
    again.goto(path)
    expect(again.locator("#invite-invalid")).to_be_visible()
    token = path.strip("/").split("/")[-1]
    log = live_site.process.log_text()
    assert token not in log and "my-own-password-9" not in log and PASSWORD not in log


def test_chinese_when_the_browser_asks_for_it(new_page):
    page = new_page(locale="zh-CN")
    page.goto("/accounts/login/")
    expect(page.locator("html")).to_have_attribute("lang", "zh-hans")
    expect(page.locator("#language option:checked")).to_have_text("简体中文")

    english = new_page(locale="en-US")
    english.goto("/accounts/login/")
    expect(english.locator("html")).to_have_attribute("lang", "en")
