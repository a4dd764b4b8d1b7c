"""Hostile input on the management API: always a 4xx in the API's one error shape, never a 5xx.

test_schema.py drives schemathesis with requests that follow the schema; this file sends what
the schema does not describe: JSON of any shape and type in every write endpoint's body
(unicode, NUL bytes, 100 KB strings, huge, negative and fractional numbers, NaN and infinity
as strings, nesting, unknown fields), bytes that are not JSON at all (invalid UTF-8, NaN
literals, 5000-digit numbers, deep nesting, a body over DATA_UPLOAD_MAX_MEMORY_SIZE, other
content types), hostile filters and cursors on the lists, hostile path parameters, and hostile
Authorization headers (100 KB, NUL, non-ASCII, "Bearer" alone, other schemes): those are 401.
After every accepted write the pages that show it are read back and must answer 200.
"""
import base64
import json

import pytest
from django.test import Client
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from api.errors import ERROR_TYPES
from tenants.models import ApiKey, Member
from tenants.services import api_key_issue

# derandomize: the same examples on every run (CI must not turn red by chance; the listed edge
# values are sent alone on every run besides)
HYPOTHESIS = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large])

SPECIAL_TEXT = [
    "", " ", "\x00", "a\x00b", "\u202eevil\u202c", "\u200f\u05e9\u05dc\u05d5\u05dd", "🙂👩‍👩‍👧‍👦", "e\u0301\u0301\u0301",
    "\ufeff", "\uffff", "\r\n\t", "<script>alert(1)</script>", "%(x)s {0}", "x" * 100_000, "é" * 50_000,
    "NaN", "Infinity", "-Infinity", "1e309", "9" * 5000, "0x10", "１２", "-1", "2026-02-30", "9999-12-31",
    "0001-01-01", "2026-13-01", "null", "true", "[]", "{}",
]
SPECIAL_NUMBERS = [0, -1, 1, 2**31 - 1, 2**31, 2**62, 2**62 + 1, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**40,
                   10**400, 1.5, -0.0, 1e308, 5e-324, 0.1 + 0.2]
scalars = (st.none() | st.booleans() | st.sampled_from(SPECIAL_NUMBERS) | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40) | st.sampled_from(SPECIAL_TEXT))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def body_of(*names):
    """A JSON body with any of these fields (or none), any value each, sometimes an unknown field too."""
    known = st.fixed_dictionaries({}, optional={name: json_values for name in names})
    extra = st.dictionaries(st.sampled_from(["role", "team", "is_active", "member", "id", "key_hash", "\x00", "é"]),
                            json_values, max_size=2)
    return st.one_of(known, st.builds(lambda a, b: {**b, **a}, known, extra), json_values)


def near_valid(valid: dict):
    """A valid body with one or two fields given any JSON value and maybe one dropped: it gets past the
    other fields, so a hostile value that is accepted reaches the service and the pages that show it."""
    names = sorted(valid)

    def build(good, bad, mutated, dropped):
        body = {name: bad[name] if name in mutated else value for name, value in good.items()}
        return {name: value for name, value in body.items() if name not in dropped}

    return st.fixed_dictionaries(valid) | st.builds(
        build, st.fixed_dictionaries(valid), st.fixed_dictionaries({n: json_values for n in names}),
        st.sets(st.sampled_from(names), max_size=2), st.sets(st.sampled_from(names), max_size=1))


# hostile and still valid for a text field: what must be stored and shown again unharmed
valid_text = st.sampled_from([
    "\u202eevil\u202c", "🙂👩‍👩‍👧‍👦🏳️‍🌈", "e\u0301\u0301\u0301", "<script>alert(1)</script>", "{{ 7|add:1 }}",
    "{% debug %}", "%(x)s %s {0}", "'; DROP TABLE x; --", "=cmd|' /C calc'!A0", "\u200f\u05e9\u05dc\u05d5\u05dd",
]) | st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(str.strip)


def assert_error_shape(response, *, statuses=range(400, 500)) -> dict:
    assert response.status_code in statuses, (response.status_code, response.content[:300])
    content_type = response.headers["Content-Type"]  # a test client's response or httpx's
    assert content_type.startswith("application/json"), content_type
    error = response.json()["error"]
    assert set(error) == {"type", "message", "fields"}, error
    assert error["type"] == ERROR_TYPES.get(response.status_code, "error"), (response.status_code, error)
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["fields"], dict)
    assert all(isinstance(k, str) and isinstance(v, list) and all(isinstance(m, str) for m in v)
               for k, v in error["fields"].items()), error["fields"]
    return error


def assert_ok_or_error(response, *, ok=(200, 201, 202)):
    assert response.status_code < 500, (response.status_code, response.content[:300])
    if response.status_code not in ok:
        assert_error_shape(response)


def assert_reads(client, *paths):
    for path in paths:
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code, response.content[:300])


@pytest.fixture(autouse=True)
def _no_throttle(monkeypatch):
    """Hundreds of generated requests from one user: the hostile values are tested, not the rate limit."""
    from rest_framework.throttling import UserRateThrottle

    monkeypatch.setattr(UserRateThrottle, "THROTTLE_RATES", {"user": "1000000/minute"})


@pytest.fixture(autouse=True)
def _mail(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"


def _dashboard(member) -> Client:
    client = Client()
    client.force_login(member.user)
    return client


# --- JSON bodies of every write endpoint ------------------------------------------------------

def test_key_create(world):
    accepted = []

    @HYPOTHESIS
    @given(body=body_of("label", "expires_days") | near_valid({"label": valid_text,
                                                               "expires_days": st.sampled_from([None, 1, 3650])}))
    def run(body):
        client = world.client(world.member)
        before = ApiKey.objects.filter(member=world.member).count()
        response = client.post(reverse("api:me-key-create"), body, format="json")
        assert_ok_or_error(response, ok=(201,))
        assert ApiKey.objects.filter(member=world.member).count() - before == (response.status_code == 201)
        if response.status_code == 201:
            key = ApiKey.objects.get(pk=response.json()["id"])
            assert "\x00" not in key.label and len(key.label) <= 100
            assert_reads(client, reverse("api:me-keys"), reverse("api:me"))
            assert_reads(_dashboard(world.member), "/keys/", "/")
            assert_reads(_dashboard(world.admin), f"/team/members/{world.member.pk}/")
        elif response.status_code == 400 and isinstance(body, dict):
            fields = assert_error_shape(response)["fields"]
            assert set(fields) <= set(body) | {"label", "expires_days"}, (fields, body)
        if response.status_code == 201:
            accepted.append(1)

    run()
    assert accepted  # some hostile values were stored, and read back


@HYPOTHESIS
@given(body=body_of("reason"))
def test_key_revoke(world, body):
    key, _raw = api_key_issue(member=world.member, label="to revoke")
    response = world.client(world.member).post(reverse("api:me-key-revoke", args=[key.pk]), body, format="json")
    assert_ok_or_error(response)
    key.refresh_from_db()
    assert (key.revoked_at is not None) == (response.status_code == 200)
    if response.status_code == 200:
        assert_reads(world.client(world.member), reverse("api:me-keys"))
        assert_reads(world.client(world.admin), reverse("api:team-audit-events", args=["lab"]))
        assert_reads(_dashboard(world.member), "/keys/", "/")


def test_member_invite(world):
    accepted = []

    @HYPOTHESIS
    @given(body=body_of("email", "username", "role", "request_quota", "token_quota", "reason") | near_valid({
        "email": st.uuids().map(lambda u: f"{u.hex[:12]}@example.org") | st.emails()
        | st.sampled_from(["x+tag@example.org", "名前@例え.テスト"]),
        "username": st.sampled_from(["名前", "\u05e9\u05dc\u05d5\u05dd", "a" * 150, "x.y+z@w-1_"])
        | st.from_regex(r"\A[\w.@+-]{1,30}\Z", fullmatch=True),
        "role": st.sampled_from(["member", "admin"]), "request_quota": st.sampled_from([None, 0, 2**62]),
        "token_quota": st.sampled_from([None, 1, 2**62]), "reason": valid_text}))
    def run(body):
        admin = world.client(world.admin)
        before = set(Member.objects.filter(team=world.team).values_list("pk", flat=True))
        response = admin.post(reverse("api:team-member-invite", args=["lab"]), body, format="json")
        assert_ok_or_error(response, ok=(201,))
        new = set(Member.objects.filter(team=world.team).values_list("pk", flat=True)) - before
        assert len(new) == (response.status_code == 201)
        for pk in new:
            member = Member.objects.select_related("user").get(pk=pk)
            assert "\x00" not in member.user.username + member.user.email and member.role in Member.Role.values
            assert_reads(admin, reverse("api:team-members", args=["lab"]), reverse("api:team-member", args=["lab", pk]),
                         reverse("api:team-audit-events", args=["lab"]))
            assert_reads(_dashboard(world.admin), "/team/", f"/team/members/{pk}/")
        if response.status_code == 201:
            accepted.append(1)

    run()
    assert accepted  # some hostile values were stored, and read back


LIMITS = ("request_quota", "token_quota", "requests_per_minute", "tokens_per_minute", "max_concurrent_requests",
          "weight", "reason")


def test_member_update(world):
    accepted = []

    @HYPOTHESIS
    @given(body=body_of(*LIMITS) | near_valid({
        "request_quota": st.sampled_from([None, 0, 2**62]), "token_quota": st.sampled_from([None, 0, 2**62]),
        "requests_per_minute": st.sampled_from([None, 1, 2**31 - 1]), "tokens_per_minute": st.sampled_from([None, 1]),
        "max_concurrent_requests": st.sampled_from([None, 1, 2**31 - 1]), "weight": st.sampled_from([1, 32767]),
        "reason": valid_text}))
    def run(body):
        admin = world.client(world.admin)
        response = admin.post(reverse("api:team-member-update", args=["lab", world.member.pk]), body, format="json")
        assert_ok_or_error(response)
        world.member.refresh_from_db()
        assert world.member.role == Member.Role.MEMBER and world.member.is_active  # never mass-assigned
        if response.status_code == 200:
            assert_reads(admin, reverse("api:team-members", args=["lab"]),
                         reverse("api:team-member", args=["lab", world.member.pk]))
            assert_reads(world.client(world.member), reverse("api:me"))
            assert_reads(_dashboard(world.member), "/")
            assert_reads(_dashboard(world.admin), "/team/", f"/team/members/{world.member.pk}/")
        if response.status_code == 200:
            accepted.append(1)

    run()
    assert accepted  # some hostile values were stored, and read back


@HYPOTHESIS
@given(action=st.sampled_from(["team-member-suspend", "team-member-reactivate"]), body=body_of("reason"))
def test_member_suspend_and_reactivate(world, action, body):
    admin = world.client(world.admin)
    response = admin.post(reverse(f"api:{action}", args=["lab", world.other.pk]), body, format="json")
    assert_ok_or_error(response)
    assert_reads(admin, reverse("api:team-member", args=["lab", world.other.pk]),
                 reverse("api:team-audit-events", args=["lab"]))
    assert_reads(_dashboard(world.admin), f"/team/members/{world.other.pk}/")
    own = admin.post(reverse("api:team-member-suspend", args=["lab", world.admin.pk]), body, format="json")
    assert_error_shape(own, statuses=(400,))
    world.admin.refresh_from_db()
    assert world.admin.is_active


def test_period_actual_cost(world):
    accepted = []

    @HYPOTHESIS
    @given(body=body_of("amount", "reason") | near_valid({
        "amount": st.sampled_from(["2999.50", "0", "0.01", "1e2", 12, 1.5, "9999999999999.99"]),
        "reason": valid_text}) | st.fixed_dictionaries({
            "amount": st.sampled_from(["-1", "NaN", "sNaN", "Infinity", "-Infinity", "1e309", "1e-309", "0.0001",
                                       "1.005", "9" * 13 + ".999", "9" * 14, "1" + "0" * 400, "1_000", " 5 ", "5\x00",
                                       "٣", "0x10", "1,5", 1e308, 5e-324, 10**400]),
            "reason": valid_text}))
    def run(body):
        admin = world.client(world.admin)
        month = f"{world.closed:%Y-%m}"
        response = admin.post(reverse("api:team-period-actual-cost", args=["lab", month]), body, format="json")
        assert_ok_or_error(response)
        period = world.team.billing_periods.get(start=world.closed)
        if response.status_code == 200:
            assert period.actual_cost is not None and period.actual_cost >= 0
        assert_reads(admin, reverse("api:team-periods", args=["lab"]), reverse("api:team-invoices", args=["lab"]))
        assert_reads(world.client(world.member), reverse("api:me"), reverse("api:me-invoices"))
        assert_reads(_dashboard(world.admin), f"/team/periods/{period.pk}/", "/team/periods/")
        if response.status_code == 200:
            accepted.append(1)

    run()
    assert accepted  # some hostile values were stored, and read back


@HYPOTHESIS
@given(action=st.sampled_from(["team-period-close", "team-period-finalize"]),
       month=st.sampled_from(["0001-01", "1000-01", "1970-01", "1999-12", "2000-01", "9998-12", "9999-12"]),
       body=json_values)
def test_period_close_and_finalize_of_any_month(world, queued, action, month, body):
    response = world.client(world.admin).post(reverse(f"api:{action}", args=["lab", month]), body, format="json")
    assert_ok_or_error(response)
    for _name, (team_id, start) in queued:
        assert start < world.this_month.isoformat()
    assert_reads(world.client(world.admin), reverse("api:team-periods", args=["lab"]))


@HYPOTHESIS
@given(body=json_values)
def test_period_close_and_finalize_ignore_any_body(world, queued, body):
    admin = world.client(world.admin)
    for action, month in (("team-period-close", world.open_over), ("team-period-finalize", world.closed)):
        response = admin.post(reverse(f"api:{action}", args=["lab", f"{month:%Y-%m}"]), body, format="json")
        assert_ok_or_error(response)


# --- bytes that are not JSON ------------------------------------------------------------------

NOT_JSON = [
    b"", b" ", b"\x00", b"\xff\xfe", b"\xef\xbb\xbf{}", b'{"label": "\xff"}', b'{"label": "\xed\xa0\x80"}',
    b'{"label": "\\ud800"}', b'{"label": "\\u0000"}', b"{'label': 'x'}", b'{"label": NaN}', b'{"expires_days": NaN}',
    b'{"expires_days": Infinity}', b'{"expires_days": -Infinity}', b'{"expires_days": 1e999}',
    b'{"expires_days": ' + b"9" * 5000 + b"}", b'{"expires_days": 0.' + b"9" * 5000 + b"}",
    b'{"label": "a", "label": "b"}', b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b"[" * 1000, b'{"label": "x"', b"null", b"true", b"1", b'"x"', b"[]", b"[{}]", b"{}" * 1000,
    b'{"label": "' + b"x" * 100_000 + b'"}', b"label=x&expires_days=1",
]
WRITES = [("api:me-key-create", []), ("api:team-member-invite", ["lab"]),
          ("api:team-member-update", ["lab", "member"]), ("api:team-member-suspend", ["lab", "other"]),
          ("api:team-period-actual-cost", ["lab", "closed"]), ("api:me-key-revoke", ["key"])]


def _write_paths(world):
    key, _raw = api_key_issue(member=world.admin, label="revocable")
    ids = {"member": world.member.pk, "other": world.other.pk, "closed": f"{world.closed:%Y-%m}", "key": key.pk}
    return [reverse(name, args=[ids.get(a, a) for a in args]) for name, args in WRITES]


def test_bytes_that_are_not_json(world):
    admin = world.client(world.admin)
    paths = _write_paths(world)
    for raw in NOT_JSON:
        for path in paths:
            response = admin.post(path, raw, content_type="application/json")
            assert response.status_code < 500, (raw[:40], path, response.status_code)
            assert_ok_or_error(response)
    assert_reads(admin, reverse("api:me-keys"), reverse("api:team-members", args=["lab"]))


def test_nesting_too_deep_for_the_decoder_is_a_parse_error(world):
    response = world.client(world.member).post(reverse("api:me-key-create"), b"[" * 100_000 + b"]" * 100_000,
                                               content_type="application/json")
    error = assert_error_shape(response, statuses=(400,))
    assert "nested too deeply" in error["message"]


CONTENT_TYPES = [
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain", "application/xml",
    "application/json; charset=klingon", "application/json; charset=utf-16", "", "\x00", "application/json\x00",
    "*/*", "application/vnd.api+json", "APPLICATION/JSON",
]


def test_other_content_types(world):
    admin = world.client(world.admin)
    paths = _write_paths(world)
    for content_type in CONTENT_TYPES:
        for path in paths:
            # generic(): the test client's post() would encode the body itself for some of these types
            response = admin.generic("POST", path, b'{"label": "x", "reason": "r"}', content_type=content_type)
            assert response.status_code < 500, (content_type, path, response.status_code)
            assert_ok_or_error(response)
            if response.status_code >= 400 and "json" not in content_type.lower():
                assert response.status_code in (400, 415), (content_type, response.status_code)


def test_a_body_over_the_upload_limit_is_refused_in_the_error_shape(world, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024  # the production default is 2.5 MB: the same path
    big = json.dumps({"label": "x", "reason": "y" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)}).encode()
    admin = world.client(world.admin)
    keys = ApiKey.objects.count()
    for path in _write_paths(world):
        response = admin.post(path, big, content_type="application/json")
        assert_error_shape(response, statuses=(413,))
    assert ApiKey.objects.count() == keys + 1  # only _write_paths's own key
    assert not ApiKey.objects.filter(revoked_at__isnull=False).exists()


def test_a_body_at_the_default_limit_is_refused(world):
    from django.conf import settings

    big = b'{"label": "' + b"x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE + b'"}'
    keys = ApiKey.objects.filter(member=world.member).count()
    response = world.client(world.member).post(reverse("api:me-key-create"), big, content_type="application/json")
    assert_error_shape(response, statuses=(413,))
    assert ApiKey.objects.filter(member=world.member).count() == keys


# --- hostile filters, cursors and path parameters ---------------------------------------------

def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")


CURSORS = [
    "", "x", "=", "====", "!!!!", "\x00", "é", "🙂", "a" * 100_000, _b64("2026-01-01T00:00:00+00:00|1"),
    _b64("2026-01-01T00:00:00|1"), _b64("0001-01-01T00:00:00|1"), _b64("0001-01-01T00:00:00+14:00|1"),
    _b64("9999-12-31T23:59:59-14:00|1"), _b64("2026-01-01T00:00:00-23:59|1"), _b64("0001-01-01T00:00:00-23:59|1"),
    _b64("9999-12-31T23:59:59-23:59|1"), _b64("9999-12-31T23:59:59.999999|1"), _b64("2026-01-01|" + "9" * 30),
    _b64("2026-01-01|-" + "9" * 30), _b64("2026-01-01|١٢"), _b64("|"), _b64("2026-01-01T00:00:00+00:00|1|2"),
    _b64("\x00|\x00"), _b64("\ud800|1"), base64.urlsafe_b64encode(b"\xff\xfe|1").decode(), _b64("2026-01-01"),
    _b64("2026-01-01T25:00:00|1"), _b64("1" * 40 + "|1"),
]
DAYS = ["", "2026-02-30", "2026-13-01", "0001-01-01", "1999-12-31", "2000-01-01", "2999-12-01", "2999-12-02",
        "9999-12-31", "10000-01-01", "-2026-01-01", "2026-1-1", "20260101", "2026-01-01T00:00", "today", "\x00",
        "١٩٩٩-٠١-٠١", "2026-11-01\x00", "x" * 100_000]
query_value = (st.text(max_size=40) | st.sampled_from(SPECIAL_TEXT) | st.sampled_from(DAYS) | st.sampled_from(CURSORS)
               | st.integers(min_value=-2**70, max_value=2**70).map(str))


def query_of(**fields):
    """Query parameters: each sent once, repeated, or not at all."""
    return st.fixed_dictionaries({}, optional={
        name: values | st.lists(values, min_size=2, max_size=3) for name, values in fields.items()})


SIZES = ["0", "1", "200", "201", "10" * 20, "9" * 5000, "-1", "1.5", "²", "١٢", "1e2", " 5", "0x10"]
TIMES = ["0", "-1", "32503680000", "32503680001", "1e10", "9" * 400, "1.5", "١٢", str(2**63)]
SHORT_TEXT = [t for t in SPECIAL_TEXT if len(t) < 1000]
# each list's parameters and the values every run sends (hypothesis adds any text besides)
LISTS = {
    "api:me-usage": dict(since=DAYS, until=DAYS, model=SHORT_TEXT, status=["ok", "error", "OK", "\x00"],
                         cursor=CURSORS, page_size=SIZES, team=["lab", "other-lab", "\x00", "é"]),
    "api:me-usage-daily": dict(since=DAYS, until=DAYS, by=["model", "member", "\x00"], team=["lab", "\x00"]),
    "api:team-usage-daily": dict(since=DAYS, until=DAYS, by=["member", "model", "user_id"]),
    "api:team-invoices": dict(month=["0000-01", "0001-01", "1999-12", "2000-01", "9999-12", "2026-00", "2026-1",
                                     "١٩٩٩-٠١", "2026-01\n"]),
    "api:team-audit-events": dict(cursor=CURSORS, page_size=SIZES),
    "organization:usage-completions": dict(start_time=TIMES, end_time=TIMES, bucket_width=["1d", "1h", "1m"],
                                           limit=SIZES, page=CURSORS, group_by=["model", "user_id", "project_id"]),
    "organization:costs": dict(start_time=TIMES, end_time=TIMES, bucket_width=["1d", "1h"], limit=["180", "181"] + SIZES,
                               page=CURSORS, group_by=["project_id", "line_item", "model"]),
}


def _list_path(name: str) -> str:
    return reverse(name, args=["lab"]) if name.startswith("api:team-") else reverse(name)


@pytest.mark.parametrize("name", sorted(LISTS))
def test_list_filters_of_any_shape(world, name):
    from tenants.tests.factories import UsageRecordFactory

    for _ in range(3):
        UsageRecordFactory(member=world.admin)
    admin = world.client(world.admin)
    path = _list_path(name)

    @HYPOTHESIS
    @given(query=query_of(**{param: st.sampled_from(values) | query_value for param, values in LISTS[name].items()}))
    def run(query):
        response = admin.get(path, query)
        assert_ok_or_error(response, ok=(200,))
        if response.status_code == 200:
            body = response.json()
            if isinstance(body, dict) and body.get("next"):
                assert_ok_or_error(admin.get(body["next"]), ok=(200,))

    run()


def test_every_listed_edge_value_of_every_filter(world):
    """The values above, each alone in each parameter, every run (hypothesis may skip some)."""
    admin = world.client(world.admin)
    for name, params in LISTS.items():
        for param, values in params.items():
            for value in values:
                response = admin.get(_list_path(name), {param: value, **({"start_time": "0"} if "time" not in param
                                                                           and name.startswith("organization") else {})})
                assert response.status_code < 500, (name, param, value[:20], response.status_code)
                assert_ok_or_error(response, ok=(200,))


def test_invalid_utf8_in_query_strings(world):
    admin = world.client(world.admin)
    for name in sorted(LISTS):
        for raw in (b"\xff", b"\xc3", b"\xed\xa0\x80", b"%FF%FE", b"%C3", b"%00", b"%ED%A0%80"):
            query = b"&".join(k.encode() + b"=" + raw for k in [*LISTS[name], "x"]) + b"&" + raw + b"=1"
            response = admin.get(_list_path(name), QUERY_STRING=query.decode("latin-1"))
            assert response.status_code < 500, (name, raw, response.status_code)
            assert_ok_or_error(response, ok=(200,))


PATHS = [
    "/api/v1/teams/{slug}/members/{id}/", "/api/v1/teams/{slug}/members/{id}/update/",
    "/api/v1/teams/{slug}/invoices/{id}/", "/api/v1/me/invoices/{id}/", "/api/v1/me/keys/{id}/revoke/",
    "/api/v1/teams/{slug}/periods/{month}/finalize/", "/api/v1/teams/{slug}/periods/{month}/actual-cost/",
    "/api/v1/teams/{slug}/periods/{month}/close/", "/api/v1/teams/{slug}/members/",
]


@HYPOTHESIS
@given(template=st.sampled_from(PATHS),
       slug=st.sampled_from(["lab", "other-lab", "LAB", "lab%00", "%C3%A9", "a" * 300, "..", "%2e%2e", "lab%2F"]),
       id=st.sampled_from(["0", "-1", "1", "99999999999999999999", "9223372036854775808", "2147483648", "%00", "1.5",
                           "１"]),
       month=st.sampled_from(["0000-01", "0001-01", "9999-12", "2026-00", "2026-13", "2026-1", "abcd-ef", "2026-11"]),
       method=st.sampled_from(["get", "post", "put", "patch", "delete", "options", "head"]))
def test_hostile_path_parameters(world, template, slug, id, month, method):
    path = template.format(slug=slug, id=id, month=month)
    response = getattr(world.client(world.admin), method)(path, {"reason": "x"}, format="json")
    assert response.status_code < 500, (method, path, response.status_code)
    if response.status_code >= 400 and method != "head":
        assert_error_shape(response)


# --- hostile Authorization headers ------------------------------------------------------------

def _wire(value: bytes) -> str:
    """A header value as a WSGI or ASGI server hands it to Django (bytes read as latin-1)."""
    return value.decode("latin-1")


HEADERS = [
    b"", b" ", b"Bearer", b"Bearer ", b"bearer", b"BEARER", b"Bearer  ", b"Bearer\t", b"Bearer \x00", b"Bearer a\x00b",
    b"Bearer qh_" + b"A" * 49, b"Bearer qh_" + b"\x00" * 49, b"Bearer " + b"A" * 100_000, b"A" * 100_000,
    b"Bearer " + "密钥".encode(), b"Bearer " + "qh_é".encode() + b"A" * 47, b"Bearer \xff\xfe", b"Bearer \xed\xa0\x80",
    "Bearer \u202eqh_".encode(), b"Basic dXNlcjpwYXNz", b"Basic " + b"A" * 100_000, b"Token abc", b"Digest x=y",
    b"Bearer a b", b"Bearer a b c", b"Bearer=abc", b"Bearer,abc", b"\x00Bearer abc", b"Bearer%20abc",
    "Вearer abc".encode(), b"Bearer " + b"qh_" * 1000, b"Bearer " + b"\t" * 10 + b"x",
]


def _urls(world):
    return [reverse("api:me"), reverse("api:me-keys"), reverse("api:team-members", args=["lab"]),
            reverse("organization:costs") + "?start_time=0", reverse("api:me-key-create")]


def test_hostile_authorization_headers_are_401(world):
    client = APIClient()
    keys = ApiKey.objects.count()
    for header in HEADERS:
        for url in _urls(world):
            method = client.post if url.endswith("create/") else client.get
            response = method(url, {"label": "x"}, format="json", HTTP_AUTHORIZATION=_wire(header))
            assert response.status_code == 401, (header[:30], url, response.status_code)
            assert_error_shape(response, statuses=(401,))
            assert response["WWW-Authenticate"].startswith("Bearer")
    assert ApiKey.objects.count() == keys


@HYPOTHESIS
@given(value=st.binary(max_size=300) | st.text(max_size=80).map(lambda t: ("Bearer " + t).encode("utf-8")))
def test_authorization_headers_of_any_bytes(world, value):
    response = APIClient().get(reverse("api:me"), HTTP_AUTHORIZATION=_wire(value))
    assert_error_shape(response, statuses=(401,))


def test_a_valid_key_with_hostile_extra_headers_still_works(world):
    """The refusals above are about the header: the real key in the same requests is answered."""
    client = APIClient()
    raw = world.keys[world.member.pk]
    for extra in ({}, {"HTTP_X_API_KEY": "\x00" * 10}, {"HTTP_COOKIE": "sessionid=\x00; csrftoken=é"},
                  {"HTTP_X_FORWARDED_FOR": "x" * 10_000}, {"HTTP_ACCEPT_LANGUAGE": "zz-" + "x" * 10_000}):
        response = client.get(reverse("api:me"), HTTP_AUTHORIZATION=f"Bearer {raw}", **extra)
        assert response.status_code == 200, (extra.keys(), response.status_code)
    for accept in ("text/html", "application/xml", "\x00", "*/*;q=NaN"):
        response = client.get(reverse("api:me"), HTTP_AUTHORIZATION=f"Bearer {raw}", HTTP_ACCEPT=accept)
        assert response.status_code in (200, 406), (accept, response.status_code)
        if response.status_code == 406:
            assert response.json()["error"]["type"] == "not_acceptable"


def test_session_with_hostile_team_parameter(world):
    client = Client()
    client.force_login(world.member.user)
    for team in ("", "\x00", "lab\x00", "é" * 1000, "x" * 100_000, "other-lab", "LAB"):
        response = client.get(reverse("api:me"), {"team": team})
        assert response.status_code in (200, 404), (team[:20], response.status_code)
        if response.status_code == 404:
            assert_error_shape(response, statuses=(404,))


def test_session_writes_with_a_missing_or_hostile_csrf_token_are_403(world):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world.admin.user)
    client.cookies["csrftoken"] = "A" * 32  # a well-formed secret: only the header is wrong ("A" * 32 would match)
    writes = _write_paths(world)
    for token in (None, "", "x", "B" * 32, "A" * 64, _wire(b"\x00" * 64), _wire("é".encode() * 32), "a" * 100_000):
        extra = {} if token is None else {"HTTP_X_CSRFTOKEN": token}
        for path in writes:
            response = client.post(path, {"label": "x", "reason": "r"}, content_type="application/json", **extra)
            assert response.status_code == 403, (path, (token or "")[:10], response.status_code)
            assert "CSRF" in assert_error_shape(response, statuses=(403,))["message"]
    assert not ApiKey.objects.filter(label="x").exists() and not ApiKey.objects.filter(revoked_at__isnull=False).exists()


def test_paths_of_invalid_utf8_are_404_in_the_error_shape(world):
    admin = world.client(world.admin)
    for path in ("/api/v1/%FF/", "/api/v1/teams/%FF/members/", "/api/v1/me/%ED%A0%80/", "/api/v1/%00/",
                 "/api/v1/teams/lab/members/%C3/", "/v1/organization/%FF", "/api/v1/teams/lab/periods/%FF%FE/close/"):
        assert_error_shape(admin.get(path), statuses=(404,))
        assert_error_shape(admin.post(path, b"{}", content_type="application/json"), statuses=(404,))


# --- over real HTTP, through qwenhub.asgi (what uvicorn hands Django, not what the test client builds) ----

@pytest.fixture(scope="module")
def asgi_server(django_db_setup, tmp_path_factory):
    from proxy.gateway.tests.conftest import GatewayProcess

    process = GatewayProcess(tmp_path_factory.mktemp("asgi-hostile"))
    yield process
    process.stop()


def _raw_request(url: str, request: bytes) -> int | None:
    """Send bytes as they are; the status line's code, or None when the server closed without one."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            return None
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None


def test_hostile_requests_over_asgi(transactional_db, asgi_server, settings):
    import httpx

    from billing.tests.factories import MemberJoinedFactory
    from tenants.tests.factories import ApiKeyFactory, TeamFactory

    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    member = MemberJoinedFactory(team=TeamFactory(slug="asgi-lab"))
    raw = ApiKeyFactory(member=member).raw
    key = {"Authorization": f"Bearer {raw}"}
    with httpx.Client(base_url=asgi_server.url, timeout=10) as http:
        assert http.get("/api/v1/me/", headers=key).status_code == 200  # the refusals below are about the input
        for header in (b"Bearer \xff\xfe", b"Bearer \xc3\x28" + b"A" * 40, "Bearer 密钥".encode(), b"Bearer",
                       b"Basic \x80", b"Bearer " + b"A" * 8000):
            response = http.get("/api/v1/me/", headers={"Authorization": header})
            assert_error_shape(response, statuses=(401,))
        for body in (b"\xff\xfe", b'{"label": "\xed\xa0\x80"}', b"[" * 10_000, b'{"expires_days": NaN}'):
            response = http.post("/api/v1/me/keys/create/", content=body,
                                 headers={**key, "Content-Type": "application/json"})
            assert_error_shape(response, statuses=(400,))
        response = http.post("/api/v1/me/keys/create/", content=b'{"label": "' + b"x" * 3_000_000 + b'"}',
                             headers={**key, "Content-Type": "application/json"})
        assert_error_shape(response, statuses=(413,))
        assert_error_shape(http.get("/api/v1/%FF%FE/", headers=key), statuses=(404,))
        assert http.get("/api/v1/me/usage/", params={"cursor": "\x00", "page_size": "²"}, headers=key
                        ).status_code == 400
        # the dashboards over ASGI: a sign-in without CSRF is a 403, a filter of invalid UTF-8 a redirect to sign in
        assert http.post("/accounts/login/", data={"username": "x\x00", "password": "y"}).status_code == 403
        assert http.get("/requests/?since=%FF&model=%ED%A0%80").status_code == 302
    assert ApiKey.objects.filter(member=member).count() == 1  # only the factory's: nothing was issued
    # bytes no client library sends: an invalid UTF-8 request target, raw NUL and 8-bit bytes in headers
    for request in (b"GET /api/v1/\xff\xfe/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                    b"GET /api/v1/me/?team=\xff HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + raw.encode()
                    + b"\r\n\r\n",
                    b"GET /api/v1/me/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \x00\r\n\r\n",
                    b"GET /api/v1/me/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + b"A" * 100_000 + b"\r\n\r\n",
                    b"GET /requests/?since=\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"):
        status = _raw_request(asgi_server.url, request)
        assert status is None or status < 500, (request[:60], status)
    assert httpx.get(asgi_server.url + "/api/v1/me/", headers=key, timeout=10).status_code == 200
    log = asgi_server.log_path.read_text(errors="replace")
    assert "Internal Server Error" not in log and "Traceback" not in log, log[-3000:]
