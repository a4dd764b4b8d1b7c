"""The database itself refuses broken invariants, even when validation is bypassed."""
import pytest
from django.db import IntegrityError, transaction

from tenants.keys import api_key_hash
from tenants.models import ApiKey, Member, Team
from tenants.tests.factories import ApiKeyFactory, MemberFactory, TeamFactory, UserFactory

pytestmark = pytest.mark.django_db


def test_duplicate_team_slug_is_refused():
    # given a team
    TeamFactory(slug="nlp")
    # when another row with the same slug is inserted without validation
    with pytest.raises(IntegrityError), transaction.atomic():
        Team.objects.create(slug="nlp", name="Another")
    # then only the first exists
    assert Team.objects.filter(slug="nlp").count() == 1


def test_same_user_twice_in_a_team_is_refused():
    member = MemberFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        Member.objects.create(team=member.team, user=member.user)
    assert Member.objects.filter(team=member.team, user=member.user).count() == 1


def test_same_user_in_two_teams_is_allowed():
    # the constraint is per (team, user), not per user
    member = MemberFactory()
    Member.objects.create(team=TeamFactory(), user=member.user)
    assert Member.objects.filter(user=member.user).count() == 2


def test_duplicate_key_hash_is_refused():
    key = ApiKeyFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        ApiKey.objects.create(member=MemberFactory(), prefix="x", key_hash=api_key_hash(key.raw))
    assert ApiKey.objects.count() == 1


@pytest.mark.parametrize("field", ["request_quota", "token_quota"])
def test_negative_quota_is_refused(field):
    team, user = TeamFactory(), UserFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        Member.objects.create(team=team, user=user, **{field: -1})
    assert not Member.objects.exists()


def test_zero_quota_is_allowed():
    member = Member.objects.create(team=TeamFactory(), user=UserFactory(), request_quota=0, token_quota=0)
    assert Member.objects.get(pk=member.pk).request_quota == 0


def test_negative_monthly_cost_and_bad_currency_are_refused():
    with pytest.raises(IntegrityError), transaction.atomic():
        Team.objects.create(slug="a", name="A", monthly_cost=-1)
    with pytest.raises(IntegrityError), transaction.atomic():
        Team.objects.create(slug="b", name="B", currency="usd")
    assert not Team.objects.exists()
