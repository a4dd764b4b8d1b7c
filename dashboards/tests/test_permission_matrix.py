"""The dashboards' role × object × action matrix, generated from their URL conf.

Every route of dashboards.member.urls, dashboards.team.urls and the invitation page needs a
CASE (a new page without one fails test_every_page_has_a_case). For each, who gets what:

    gate      anonymous   member   team admin   other team's admin     another's object
    member    login       ok       ok           ok (their own data)    404
    admin     login       403      ok           ok / 404 for ours      404

"ok" is an answer past the gates (200, a redirect to a page, or a form error); POST-only
actions answer 405 to GET and 403 without the CSRF token.
"""
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Callable

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from billing.models import BillingPeriod, Invoice
from billing.services import period_close
from billing.tests.conftest import SHANGHAI, finalized_month
from billing.tests.factories import MemberJoinedFactory
from tenants.models import ApiKey
from tenants.services import api_key_issue
from tenants.tests.factories import TeamFactory, UserFactory

pytestmark = pytest.mark.django_db
NOV = date(2026, 11, 1)
BODY = {"reason": "matrix", "label": "matrix", "team": "lab", "month": "2026-10", "amount": "1", "weight": "1",
        "expires_days": ""}
OK = {200, 302, 400}


@dataclass
class Case:
    method: str
    gate: str  # "member" or "admin"
    obj: Callable | None = None  # (world, own) -> URL kwargs; None: the page has no object
    extra: dict = field(default_factory=dict)


def _key(w, own):
    return {"key_id": (w.bob_key if own else w.carol_key).pk}


def _invoice(w, own):
    return {"invoice_id": (w.invoices["bob"] if own else w.invoices["carol"]).pk}


def _member(w, own):
    return {"member_id": (w.members["bob"] if own else w.yuri).pk}


def _team_key(w, own):
    return {"key_id": (w.bob_key if own else w.yuri_key).pk}


def _period(w, own):
    return {"period_id": (w.period if own else w.period_b).pk}


CASES = {
    "member:home": Case("get", "member"),
    "member:switch_team": Case("post", "member"),
    "member:keys": Case("get", "member"),
    "member:key_create": Case("post", "member"),
    "member:key_revoke": Case("post", "member", _key),
    "member:requests": Case("get", "member"),
    "member:requests_csv": Case("get", "member"),
    "member:invoices": Case("get", "member"),
    "member:invoice": Case("get", "member", _invoice),
    "team:home": Case("get", "admin"),
    "team:export": Case("get", "admin"),
    "team:member": Case("get", "admin", _member),
    "team:member_limits": Case("post", "admin", _member),
    "team:member_suspend": Case("post", "admin", _member),
    "team:member_reactivate": Case("post", "admin", _member),
    "team:member_invite": Case("post", "admin", _member),
    "team:key_revoke": Case("post", "admin", _team_key),
    "team:periods": Case("get", "admin"),
    "team:period_close": Case("post", "admin"),
    "team:period": Case("get", "admin", _period),
    "team:period_actual_cost": Case("post", "admin", _period),
    "team:period_finalize": Case("post", "admin", _period),
    "invite": Case("get", "admin"),
}


def _names(patterns, namespace):
    for p in patterns:
        if isinstance(p, URLResolver):
            continue
        assert isinstance(p, URLPattern)
        yield f"{namespace}:{p.name}" if namespace else p.name


def test_every_page_has_a_case():
    from dashboards.member import urls as member_urls
    from dashboards.team import urls as team_urls

    names = {*_names(member_urls.urlpatterns, "member"), *_names(team_urls.urlpatterns, "team"), "invite"}
    assert names == set(CASES)
    assert reverse("invite") in {f"/accounts/{p.pattern}" for p in get_resolver().url_patterns[1].url_patterns}


@pytest.fixture
def w():
    """lab: alice (admin), bob and carol (members), November finalized; the other team: zed (admin), yuri."""
    period, members = finalized_month()
    other = TeamFactory(slug="other", name="Other", timezone="Asia/Shanghai", currency="CNY")
    zed = MemberJoinedFactory(team=other, user=UserFactory(username="zed"), role="admin")
    yuri = MemberJoinedFactory(team=other, user=UserFactory(username="yuri"))
    period_b = period_close(team=other, start=NOV, now=datetime(2026, 12, 1, 0, 10, tzinfo=SHANGHAI), wait_seconds=0)
    api_key_issue(member=members["bob"], label="bob's")
    api_key_issue(member=members["carol"], label="carol's")
    api_key_issue(member=yuri, label="yuri's")

    class World:
        pass
    world = World()
    world.period, world.period_b, world.members, world.zed, world.yuri = period, period_b, members, zed, yuri
    world.invoices = {name: Invoice.objects.get(period=period, member=m) for name, m in members.items()}
    world.bob_key = ApiKey.objects.get(member=members["bob"])
    world.carol_key = ApiKey.objects.get(member=members["carol"])
    world.yuri_key = ApiKey.objects.get(member=yuri)
    assert BillingPeriod.objects.count() == 2
    return world


def _client(user=None, csrf=False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    if user is not None:
        client.force_login(user)
    return client


def _call(client, name, case, kwargs):
    url = reverse(name, kwargs=kwargs)
    return client.post(url, BODY) if case.method == "post" else client.get(url)


def _kwargs(w, case, own=True):
    return case.obj(w, own) if case.obj else {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_anonymous_is_sent_to_sign_in(w, name):
    case = CASES[name]
    response = _call(_client(), name, case, _kwargs(w, case))
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_member(w, name):
    case = CASES[name]
    response = _call(_client(w.members["bob"].user), name, case, _kwargs(w, case))
    expected = OK if case.gate == "member" else {403}
    assert response.status_code in expected, (name, response.status_code)
    if case.gate == "member" and case.obj:
        other = _call(_client(w.members["bob"].user), name, case, _kwargs(w, case, own=False))
        assert other.status_code == 404, (name, "another member's object")


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_team_admin(w, name):
    case = CASES[name]
    alice = w.members["alice"].user
    if case.gate == "admin":
        response = _call(_client(alice), name, case, _kwargs(w, case))
        assert response.status_code in OK, (name, response.status_code)
        if case.obj:
            other = _call(_client(alice), name, case, _kwargs(w, case, own=False))
            assert other.status_code == 404, (name, "another team's object")
    elif case.obj:  # a member page's object of another member: even an admin gets 404 on the member pages
        assert _call(_client(alice), name, case, _kwargs(w, case)).status_code == 404, name


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.obj))
def test_another_teams_admin_finds_nothing_of_ours(w, name):
    case = CASES[name]
    response = _call(_client(w.zed.user), name, case, _kwargs(w, case))
    assert response.status_code == 404, name


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.method == "post"))
def test_actions_are_post_only_and_need_the_csrf_token(w, name):
    case = CASES[name]
    user = (w.members["alice"] if case.gate == "admin" else w.members["bob"]).user
    url = reverse(name, kwargs=_kwargs(w, case))
    assert _client(user).get(url).status_code == 405, name
    assert _client(user, csrf=True).post(url, BODY).status_code == 403, name
