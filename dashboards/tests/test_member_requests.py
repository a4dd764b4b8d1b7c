"""The member's recent requests: newest first, filtered, paged by keyset, exported as a streamed CSV."""
import csv
import io
import re
import zoneinfo
from datetime import date, datetime, timedelta

import pytest
from django.http import StreamingHttpResponse

from billing.tests.factories import usage
from tenants.services import api_key_issue
from tenants.tests.factories import MemberFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
NOV = date(2026, 11, 1)


@pytest.fixture
def people():
    team = TeamFactory(slug="lab", name="Lab")
    alice = MemberFactory(team=team, user=UserFactory(username="alice"))
    bob = MemberFactory(team=team, user=UserFactory(username="bob"))
    return alice, bob


def _rows(page: str) -> list[str]:
    return re.findall(r'<tr class="request">(.*?)</tr>', page, re.S)


def _csv(response) -> list[dict]:
    assert isinstance(response, StreamingHttpResponse)
    return list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))


@pytest.fixture
def month(people):
    alice, bob = people
    key, _ = api_key_issue(member=alice, label="laptop")
    usage(alice, NOV, prompt=11, completion=1, started_at=datetime(2026, 11, 3, 23, 30, tzinfo=SHANGHAI),
          api_key=key, ttft_ms=42.4, duration_ms=900.6)
    usage(alice, NOV, prompt=22, completion=2, model="qwen2.5-72b",
          started_at=datetime(2026, 11, 4, 0, 30, tzinfo=SHANGHAI))
    usage(alice, NOV, prompt=33, completion=0, status="rejected", http_status=429,
          started_at=datetime(2026, 11, 5, 8, tzinfo=SHANGHAI))
    usage(bob, NOV, prompt=999_999, completion=5, started_at=datetime(2026, 11, 4, 1, tzinfo=SHANGHAI))
    return alice, bob, key


def test_newest_first_with_every_column_and_only_mine(client, month):
    alice, _, key = month
    client.force_login(alice.user)
    page = client.get("/requests/").content.decode()
    rows = _rows(page)
    assert len(rows) == 3 and "999,999" not in page
    assert "2026-11-05 08:00:00" in rows[0] and "Rejected" in rows[0]
    assert "qwen2.5-72b" in rows[1]
    oldest = rows[2]
    assert "2026-11-03 23:30:00" in oldest and ">11<" in oldest and ">1<" in oldest
    assert ">901<" in oldest and ">42<" in oldest and f"{key.prefix}…" in oldest


def test_filters_by_team_days_model_and_status(client, month):
    alice, *_ = month
    client.force_login(alice.user)
    # Nov 4 in Shanghai: 00:30 is in it, 23:30 on Nov 3 is not (it is Nov 3 15:30 UTC, and 16:30 UTC Nov 3 is Nov 4)
    assert len(_rows(client.get("/requests/?since=2026-11-04&until=2026-11-04").content.decode())) == 1
    assert len(_rows(client.get("/requests/?since=2026-11-03&until=2026-11-04").content.decode())) == 2
    assert len(_rows(client.get("/requests/?model=qwen2.5-72b").content.decode())) == 1
    assert len(_rows(client.get("/requests/?status=rejected").content.decode())) == 1
    assert len(_rows(client.get("/requests/?status=ok&model=qwen2.5-7b-instruct").content.decode())) == 1


@pytest.mark.parametrize("query, error", [
    ("since=2026-13-45", "Enter a valid date."),
    ("until=yesterday", "Enter a valid date."),
    ("since=2026-11-05&until=2026-11-01", "The end date must not be before the start date."),
    ("status=bogus", "Select a valid choice."),
    ("after=not-a-cursor", "This page link is not valid"),
    ("after=2026-11-01T00:00:00_abc", "This page link is not valid"),
    ("after=2026-11-01T00:00:00_5", "This page link is not valid"),  # no time zone
])
def test_bad_filters_are_a_form_error_not_a_500(client, month, query, error):
    alice, *_ = month
    client.force_login(alice.user)
    for url in ("/requests/", "/requests.csv"):
        response = client.get(f"{url}?{query}")
        assert response.status_code == 400 and error in response.content.decode()
        assert not _rows(response.content.decode())


def test_keyset_pages_cover_every_row_once_with_the_same_query_count(client, people, django_assert_num_queries):
    alice, bob = people
    start = datetime(2026, 11, 10, 12, tzinfo=SHANGHAI)
    # 130 rows; ten share the newest instant, ten more share one instant across the first page's end
    # (rows 48..57): the id breaks the ties
    for n in range(120):
        usage(alice, NOV, prompt=n, started_at=start - timedelta(minutes=0 if n < 10 else n))
    for n in range(10):
        usage(alice, NOV, prompt=1000 + n, started_at=start - timedelta(minutes=47, seconds=30))
    usage(bob, NOV, started_at=start)
    client.force_login(alice.user)
    seen, url, links = [], "/requests/?status=ok", []
    while url:
        # session, user, memberships, the page of rows, keys, models
        with django_assert_num_queries(6):
            page = client.get(url).content.decode()
        seen += [int(re.search(r'<td class="num">([\d,]+)</td>', r).group(1).replace(",", "")) for r in _rows(page)]
        found = re.search(r'<a href="\?([^"]+)" rel="next">', page)
        url = "/requests/?" + found.group(1).replace("&amp;", "&") if found else None
        links.append(url)
    assert len(links) == 3 and len(seen) == 130 and len(set(seen)) == 130
    assert "status=ok" in links[0] and "after=" in links[0]
    assert "Newest" in page  # a later page links back to the first


def test_csv_streams_the_same_filters_in_team_time(client, month):
    alice, _, key = month
    client.force_login(alice.user)
    response = client.get("/requests.csv?since=2026-11-03&until=2026-11-04&status=ok")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    assert 'attachment; filename="requests-lab-alice-' in response["Content-Disposition"]
    table = _csv(response)
    assert [(r["started_at"], r["model"], r["prompt_tokens"], r["key"]) for r in table] == [
        ("2026-11-04T00:30:00.000+08:00", "qwen2.5-72b", "22", ""),
        ("2026-11-03T23:30:00.000+08:00", "qwen2.5-7b-instruct", "11", key.prefix)]
    assert table[1]["ttft_ms"] == "42.4" and table[1]["duration_ms"] == "900.6"


def test_csv_has_only_my_rows_and_no_prompt_column(client, month):
    alice, *_ = month
    client.force_login(alice.user)
    table = _csv(client.get("/requests.csv"))
    assert len(table) == 3 and all(r["prompt_tokens"] != "999999" for r in table)
    assert not any("prompt" == c or "messages" in c or "content" in c for c in table[0])


def test_csv_query_count_does_not_grow_with_rows(client, people, django_assert_max_num_queries):
    alice, _ = people
    for n in range(50):
        usage(alice, NOV, started_at=datetime(2026, 11, 2, tzinfo=SHANGHAI) + timedelta(minutes=n))
    client.force_login(alice.user)
    # session, user, memberships, keys, and the rows through one server-side cursor
    with django_assert_max_num_queries(6):
        assert len(_csv(client.get("/requests.csv"))) == 50


def test_requests_pages_need_a_member(client, people):
    assert client.get("/requests/").status_code == 302
    assert client.get("/requests.csv").status_code == 302
    client.force_login(UserFactory(username="stranger"))
    assert client.get("/requests/").status_code == 403 and client.get("/requests.csv").status_code == 403


@pytest.mark.django_db(transaction=True)
def test_csv_under_asgi_streams_an_async_iterator_of_the_same_rows(people):
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    alice, bob = people
    for n in range(1200):  # several batches of lines
        usage(alice, NOV, prompt=n, started_at=datetime(2026, 11, 2, tzinfo=SHANGHAI) + timedelta(seconds=n))
    usage(bob, NOV)
    client = AsyncClient()
    client.force_login(alice.user)

    async def fetch():
        response = await client.get("/requests.csv")
        assert response.is_async and response.status_code == 200
        return b"".join([chunk async for chunk in response.streaming_content])

    table = list(csv.DictReader(io.StringIO(async_to_sync(fetch)().decode())))
    assert len(table) == 1200 and table[0]["prompt_tokens"] == "1199" and table[-1]["prompt_tokens"] == "0"
