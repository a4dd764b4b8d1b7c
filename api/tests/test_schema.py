"""The OpenAPI schema: complete, valid, served without a CDN, and true to the live API (schemathesis)."""
import re

import pytest
import schemathesis
from django.urls import reverse
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from schemathesis.checks import (
    content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance,
)

from api.tests.test_permissions import CASES


@pytest.fixture(scope="module")
def spec():
    return SchemaGenerator().get_schema(request=None, public=True)


def _openapi_path(pattern_route: str) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", pattern_route)


def test_schema_is_valid_and_has_every_endpoint_with_its_errors(spec):
    validate_schema(spec)
    operations = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert len(operations) == len(CASES)
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert operation.get("summary"), (path, method)
            assert {"200", "201", "202"} & set(operation["responses"]), (path, method)
            assert {"400", "401", "429"} <= set(operation["responses"]), (path, method)
            assert {"apiKey": []} in operation["security"], (path, method)
            if "{slug}" in path:
                assert {"403", "404"} <= set(operation["responses"]), (path, method)


def test_schema_and_docs_are_served_without_a_cdn(client):
    assert client.get(reverse("api:schema")).status_code == 200
    page = client.get(reverse("api:docs")).content.decode()
    assert "swagger-ui" in page
    assert not re.search(r"""(src|href)=["']https?://""", page), "the docs must not load anything remote"


# --- property-based: generated requests against a live server -----------------------------

@pytest.fixture
def live_world(transactional_db, live_server, settings, monkeypatch):
    from billing.tests.factories import MemberJoinedFactory
    from tenants.models import Member
    from tenants.tests.factories import ApiKeyFactory, TeamFactory, UsageRecordFactory

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    from rest_framework.throttling import UserRateThrottle

    monkeypatch.setattr(UserRateThrottle, "THROTTLE_RATES", {"user": "100000/minute"})
    team = TeamFactory(slug="lab")
    admin = MemberJoinedFactory(team=team, role=Member.Role.ADMIN)
    key = ApiKeyFactory(member=admin)
    for _ in range(3):
        UsageRecordFactory(member=admin)
    return live_server, team, key.raw


def test_generated_requests_get_no_5xx_and_match_the_schema(live_world):
    """Every operation, a few generated requests each (bounded: < 60 s); schemathesis's own pytest
    integration does not load under this pytest, so the operations are driven from here."""
    server, team, raw = live_world
    schema = schemathesis.openapi.from_url(server.url + reverse("api:schema"))
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    # revoking may hit the caller's own key (the ids are small): that one runs last
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=lambda o: "revoke" in o.label)
    assert len(operations) == len(CASES)
    statuses = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=6, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(HealthCheck))
        def run(case):
            if "slug" in (case.path_parameters or {}):
                case.path_parameters["slug"] = team.slug  # reach the handlers, not only unknown teams' 404
            response = case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {raw}"},
                                              timeout=10, checks=checks)
            statuses.append((operation.label, response.status_code))

        run()
    # the run reached the handlers (not only refusals) of many operations
    assert len(statuses) > 3 * len(operations)
    assert len({label for label, code in statuses if code < 300}) >= len(operations) // 3, sorted(set(statuses))
