"""The gateway's key cache: one database lookup for many concurrent misses."""
import asyncio
from unittest import mock

from proxy.gateway import keys
from tenants.services import api_key_issue, member_add, team_create


def test_concurrent_misses_share_one_lookup(transactional_db):
    team = team_create(slug="cache", name="Cache")
    member = member_add(team=team, username="many")
    _, raw = api_key_issue(member=member)
    keys.forget_all()

    async def run():
        return await asyncio.gather(*(keys.authenticate(raw) for _ in range(50)))

    with mock.patch.object(keys, "_load", wraps=keys._load) as load:
        infos = asyncio.run(run())
    assert load.call_count == 1
    assert {info.member_id for info in infos} == {member.pk}
    assert not keys._loading


def test_invalid_keys_never_reach_the_database(transactional_db):
    keys.forget_all()
    with mock.patch.object(keys, "_load", wraps=keys._load) as load:
        assert asyncio.run(keys.authenticate("qh_" + "A" * 49)) is None  # bad checksum
        assert asyncio.run(keys.authenticate("short")) is None
    assert load.call_count == 0
