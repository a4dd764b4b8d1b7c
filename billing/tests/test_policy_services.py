"""billing_policy_get_or_create and billing_policy_update: defaults, validation, audit."""
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError

from billing.models import MODEL_WEIGHTS_INVALID, PUBLIC_PRICES_INVALID, BillingPolicy
from billing.selectors import billing_policy_for_team
from billing.services import (
    IDLE_PAYER_OTHER_TEAM, POLICY_FIELD_UNKNOWN, billing_policy_get_or_create, billing_policy_update,
)
from billing.tests.factories import MemberJoinedFactory
from tenants.models import AuditEvent
from tenants.tests.factories import TeamFactory

pytestmark = pytest.mark.django_db


def test_a_new_team_starts_on_usage_with_weights_one_and_no_grace():
    team = TeamFactory()
    unsaved = billing_policy_for_team(team=team)
    assert unsaved.pk is None and unsaved.kind == "usage"
    policy = billing_policy_get_or_create(team=team)
    assert (policy.kind, policy.prompt_weight, policy.completion_weight, policy.grace_days) == (
        "usage", Decimal(1), Decimal(1), 0)
    assert billing_policy_get_or_create(team=team).pk == policy.pk and BillingPolicy.objects.count() == 1
    assert AuditEvent.objects.filter(data__action="billing.policy_created").count() == 1


def test_update_records_what_changed_and_a_no_op_records_nothing():
    team = TeamFactory()
    payer = MemberJoinedFactory(team=team)
    billing_policy_update(team=team, kind="seed_rate", idle_payer=payer, public_prices={"m": {"prompt": "0.3"}})
    event = AuditEvent.objects.get(data__action="billing.policy_updated")
    assert event.data["after"] == {"kind": "seed_rate", "idle_payer": payer.pk,
                                   "public_prices": {"m": {"prompt": "0.3"}}}
    billing_policy_update(team=team, kind="seed_rate", prompt_weight=Decimal("1.000"))
    assert AuditEvent.objects.filter(data__action="billing.policy_updated").count() == 1


@pytest.mark.parametrize("changes, message", [
    ({"model_weights": {"m": "-1"}}, MODEL_WEIGHTS_INVALID),
    ({"model_weights": ["m"]}, MODEL_WEIGHTS_INVALID),
    ({"public_prices": {"m": "0.3"}}, PUBLIC_PRICES_INVALID),
    ({"public_prices": {"m": {"input": "0.3"}}}, PUBLIC_PRICES_INVALID),
    ({"kind": "lottery"}, None),
    ({"base_share": Decimal("1.5")}, None),
    ({"colour": "red"}, POLICY_FIELD_UNKNOWN.format(name="colour")),
])
def test_update_refuses_bad_settings_and_changes_nothing(changes, message):
    team = TeamFactory()
    with pytest.raises(ValidationError) as exc:
        billing_policy_update(team=team, **changes)
    if message:
        assert message in exc.value.messages
    assert billing_policy_for_team(team=team).kind == "usage"
    assert not AuditEvent.objects.filter(data__action="billing.policy_updated").exists()


def test_the_idle_payer_must_belong_to_the_team():
    team, other = TeamFactory(), TeamFactory()
    with pytest.raises(ValidationError) as exc:
        billing_policy_update(team=team, idle_payer=MemberJoinedFactory(team=other))
    assert exc.value.messages == [IDLE_PAYER_OTHER_TEAM.format(team=team)]
