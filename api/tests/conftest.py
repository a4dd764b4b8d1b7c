"""Fixtures for the API: two teams with admins, members and keys; past months closed and finalized."""
import zoneinfo
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import pytest
from rest_framework.test import APIClient

from billing.services import period_close, period_finalize
from billing.tests.factories import MemberJoinedFactory, usage
from tenants.models import Member
from tenants.periods import period_start_for
from tenants.tests.factories import ApiKeyFactory, TeamFactory


def month_before(start: date, n: int = 1) -> date:
    for _ in range(n):
        start = (start - timedelta(days=1)).replace(day=1)
    return start


@dataclass
class World:
    team: object
    admin: Member
    member: Member
    other: Member  # another member of the same team
    team_b: object
    admin_b: Member
    member_b: Member
    keys: dict = field(default_factory=dict)  # member pk → raw key
    this_month: date = None
    closed: date = None  # last month: closed, drafts
    finalized: date = None  # the month before: finalized, invoices issued
    open_over: date = None  # three months ago: over, never closed

    def client(self, member: Member | None = None) -> APIClient:
        client = APIClient()
        if member is not None:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.keys[member.pk]}")
        return client


def _member(team, role=Member.Role.MEMBER, **kwargs):
    member = MemberJoinedFactory(team=team, role=role, **kwargs)
    return member


@pytest.fixture
def world(db) -> World:
    team = TeamFactory(slug="lab", timezone="Asia/Shanghai")
    team_b = TeamFactory(slug="other-lab", timezone="UTC")
    admin, member, other = (_member(team, Member.Role.ADMIN), _member(team), _member(team))
    admin_b, member_b = _member(team_b, Member.Role.ADMIN), _member(team_b)
    w = World(team, admin, member, other, team_b, admin_b, member_b)
    for m in (admin, member, other, admin_b, member_b):
        w.keys[m.pk] = ApiKeyFactory(member=m).raw
    w.this_month = period_start_for(team.timezone)
    w.closed, w.finalized, w.open_over = (month_before(w.this_month, n) for n in (1, 2, 3))
    for t, members in ((team, (admin, member, other)), (team_b, (admin_b, member_b))):
        for start in (w.finalized, w.closed):
            for m in members:
                usage(m, start, prompt=100 * m.pk, completion=10)
            period_close(team=t, start=start, wait_seconds=0)
        period_finalize(period=t.billing_periods.get(start=w.finalized))
    return w


@pytest.fixture(autouse=True)
def queued(monkeypatch):
    """Tasks the API enqueues (after commit), recorded instead of sent to a broker."""
    from billing import tasks

    calls = []
    for name in ("period_close_task", "period_statements_send_task"):
        task = getattr(tasks, name)
        monkeypatch.setattr(task, "delay_on_commit", lambda *args, _n=name, **kw: calls.append((_n, args)))
    return calls


def local(team, *args) -> datetime:
    return datetime(*args, tzinfo=zoneinfo.ZoneInfo(team.timezone))


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    """The factories' users get a password; a real hasher's work factor would dominate these tests."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
