"""The role × object permission matrix, generated from the API's URL conf.

Every route of api.urls and api.organization_urls (the schema and docs pages excepted)
needs a CASE: a new endpoint without one fails test_every_endpoint_has_a_case. For each,
who gets what:

    access               anonymous  member    admin    other team's admin   another's object
    member               401        2xx       2xx      2xx (own data)       404
    team_admin           401        403       2xx      404                  404
    organization_admin   401        403       2xx      2xx (own team)       -
"""
import itertools
from dataclasses import dataclass
from typing import Callable

import pytest
from django.urls import URLPattern, URLResolver, reverse

from api import organization_urls, urls as api_urls
from billing.models import Invoice

PUBLIC = {"api:schema", "api:docs", "api:not-found", "organization:not-found"}


def _patterns(patterns, namespace):
    for p in patterns:
        if isinstance(p, URLResolver):
            yield from _patterns(p.url_patterns, namespace)
        elif isinstance(p, URLPattern):
            yield f"{namespace}:{p.name}", p


ROUTES = dict(_patterns(api_urls.urlpatterns, "api")) | dict(_patterns(organization_urls.urlpatterns,
                                                                        "organization"))


@dataclass
class Case:
    method: str
    ok: int
    kwargs: Callable = lambda w, own: {}  # own=False: another member's / team's object
    body: Callable = lambda w: {}
    query: dict = None
    has_object: bool = False


def _team(w, own=True):
    return {"slug": w.team.slug}


def _key_of(w, own):
    member = w.member if own else w.other
    return member.api_keys.get().pk


def _invoice_of(w, own):
    member = w.member if own else w.other
    return Invoice.objects.get(member=member, period__start=w.finalized).pk


def _team_member(w, own):
    return w.member.pk if own else w.member_b.pk


def _team_invoice(w, own):
    team = w.team if own else w.team_b
    return Invoice.objects.filter(team=team).first().pk


_invites = itertools.count()

CASES = {
    "api:me": Case("get", 200),
    "api:me-keys": Case("get", 200),
    "api:me-key-create": Case("post", 201, body=lambda w: {"label": "ci"}),
    "api:me-key-revoke": Case("post", 200, kwargs=lambda w, own: {"key_id": _key_of(w, own)}, has_object=True),
    "api:me-usage": Case("get", 200),
    "api:me-usage-daily": Case("get", 200),
    "api:me-invoices": Case("get", 200),
    "api:me-invoice": Case("get", 200, kwargs=lambda w, own: {"invoice_id": _invoice_of(w, own)}, has_object=True),
    "api:team-members": Case("get", 200, kwargs=_team),
    "api:team-member-invite": Case("post", 201, kwargs=_team, body=lambda w: {
        "email": f"new{next(_invites)}@example.org", "username": f"invited-{next(_invites)}"}),
    "api:team-member": Case("get", 200, kwargs=lambda w, own: {**_team(w), "member_id": _team_member(w, own)},
                            has_object=True),
    "api:team-member-update": Case("post", 200, body=lambda w: {"token_quota": 5000, "reason": "more"},
                                   kwargs=lambda w, own: {**_team(w), "member_id": _team_member(w, own)},
                                   has_object=True),
    "api:team-member-suspend": Case("post", 200,
                                    kwargs=lambda w, own: {**_team(w), "member_id": _team_member(w, own)},
                                    has_object=True),
    "api:team-member-invitation": Case("post", 400,  # the member has a password: refused after the gates
                                       kwargs=lambda w, own: {**_team(w), "member_id": _team_member(w, own)},
                                       has_object=True),
    "api:team-member-reactivate": Case("post", 400,  # the member is active: refused, but only after the gates
                                       kwargs=lambda w, own: {**_team(w), "member_id": _team_member(w, own)},
                                       has_object=True),
    "api:team-usage-daily": Case("get", 200, kwargs=_team),
    "api:team-periods": Case("get", 200, kwargs=_team),
    "api:team-period-close": Case("post", 202, kwargs=lambda w, own: {**_team(w), "month": w.open_over}),
    "api:team-period-finalize": Case("post", 200, kwargs=lambda w, own: {**_team(w), "month": w.closed}),
    "api:team-period-actual-cost": Case("post", 200, kwargs=lambda w, own: {**_team(w), "month": w.closed},
                                        body=lambda w: {"amount": "2500.00", "reason": "real bill"}),
    "api:team-invoices": Case("get", 200, kwargs=_team),
    "api:team-invoice": Case("get", 200, kwargs=lambda w, own: {**_team(w), "invoice_id": _team_invoice(w, own)},
                             has_object=True),
    "api:team-audit-events": Case("get", 200, kwargs=_team),
    "api:team-upstreams": Case("get", 200, kwargs=_team),
    "organization:usage-completions": Case("get", 200, query={"start_time": 1700000000}),
    "organization:costs": Case("get", 200, query={"start_time": 1700000000}),
}


def test_every_endpoint_has_a_case():
    assert set(ROUTES) - PUBLIC == set(CASES), "each API route needs a permission case (and no stale ones)"


def test_every_endpoint_declares_its_access():
    for name in CASES:
        assert ROUTES[name].callback.view_class.access in {"member", "team_admin", "organization_admin"}, name


def _call(w, name, *, caller, own=True):
    case = CASES[name]
    client = w.client(caller)
    url = reverse(name, kwargs=case.kwargs(w, own))
    if case.method == "get":
        return getattr(client, case.method)(url, case.query or {})
    return client.post(url + ("?" + "&".join(f"{k}={v}" for k, v in case.query.items()) if case.query else ""),
                       case.body(w), format="json")


MATRIX = {
    "member": {"anonymous": 401, "member": "ok", "admin": "ok", "admin_b": "ok_own"},
    "team_admin": {"anonymous": 401, "member": 403, "admin": "ok", "admin_b": 404},
    "organization_admin": {"anonymous": 401, "member": 403, "admin": "ok", "admin_b": "ok_own"},
}


def _cells():
    for name in sorted(CASES):
        access = ROUTES[name].callback.view_class.access
        for role, expected in MATRIX[access].items():
            yield pytest.param(name, role, expected, id=f"{name}-{role}")
        if CASES[name].has_object:
            yield pytest.param(name, "admin", 404, id=f"{name}-another's-object")


@pytest.mark.parametrize(("name", "role", "expected"), list(_cells()))
def test_permission_matrix(world, name, role, expected):
    caller = {"anonymous": None, "member": world.member, "admin": world.admin, "admin_b": world.admin_b}[role]
    case = CASES[name]
    if expected == "ok_own":
        if case.has_object:  # the other team's admin has no such object of their own here
            pytest.skip("object cases are covered by another's-object")
        expected = case.ok
    elif expected == "ok":
        expected = case.ok
    own = not (expected == 404 and role == "admin")
    if name.startswith("api:me") and role == "admin" and case.has_object and own:
        # the admin has no such object of their own: the member's own object is "another's" for them
        pytest.skip("the member row covers own objects")
    response = _call(world, name, caller=caller, own=own)
    assert response.status_code == expected, response.content
    if expected >= 400:
        assert set(response.json()["error"]) == {"type", "message", "fields"}
