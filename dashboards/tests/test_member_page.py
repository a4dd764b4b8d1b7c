"""The member's own page shows their quota, keys and the admin changes to their account (only theirs)."""
import pytest
from django.contrib.auth import get_user_model

from tenants.services import api_key_issue, member_add, quota_top_up, team_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def team():
    return team_create(slug="lab", name="The Lab", timezone_name="Asia/Shanghai")


def test_member_sees_top_up_with_who_and_why(client, team):
    alice = member_add(team=team, username="alice", password="pw-alice-123", request_quota=100, token_quota=5000)
    bob = member_add(team=team, username="bob", password="pw-bob-123", request_quota=7)
    api_key_issue(member=alice, label="laptop")
    api_key_issue(member=bob, label="bobs-secret-label")
    boss = get_user_model().objects.create_user("boss", password="x")
    quota_top_up(member=alice, requests=50, actor=boss, reason="conference deadline")
    quota_top_up(member=bob, requests=3, actor=boss, reason="bob only")

    client.login(username="alice", password="pw-alice-123")
    page = client.get("/").content.decode()
    assert "conference deadline" in page and "boss" in page and "+50 requests" in page
    assert "150" in page  # this month's request limit after the top-up
    assert "laptop" in page
    assert "bob only" not in page and "bobs-secret-label" not in page


def test_anonymous_is_sent_to_login(client):
    response = client.get("/")
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
