"""Writes for a team's billing policy (created lazily with the defaults: `usage`, weights 1 and 1)."""
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.db import transaction

from billing.models import BillingPolicy
from billing.services.audit import POLICY_CREATED, POLICY_UPDATED, billing_audit
from tenants.models import Team

POLICY_FIELDS = ("kind", "prompt_weight", "completion_weight", "model_weights", "base_share", "quota_unit",
                 "idle_payer", "grace_days", "public_prices")
POLICY_FIELD_UNKNOWN = "Unknown billing policy setting {name!r}."
IDLE_PAYER_OTHER_TEAM = "The idle capacity's payer must be a member of {team}."


@transaction.atomic
def billing_policy_get_or_create(*, team: Team, actor=None) -> BillingPolicy:
    """Return the team's policy, creating it with the defaults (the unique team decides a race)."""
    policy, created = BillingPolicy.objects.get_or_create(team=team)
    if created:
        billing_audit(action=POLICY_CREATED, team=team, actor=actor, subject_id=policy.pk, data={"kind": policy.kind})
    return policy


@transaction.atomic  # not durable: the admin's change form calls it inside its own transaction
def billing_policy_update(*, team: Team, actor=None, reason: str = "", **changes) -> BillingPolicy:
    """Change the team's policy; the next close uses it (closed periods keep their snapshot)."""
    unknown = set(changes) - set(POLICY_FIELDS)
    if unknown:
        raise ValidationError(POLICY_FIELD_UNKNOWN.format(name=sorted(unknown)[0]))
    policy = billing_policy_get_or_create(team=team, actor=actor)
    policy = BillingPolicy.objects.select_for_update(no_key=True).get(pk=policy.pk)
    before = {name: _plain(getattr(policy, name)) for name in changes}
    for name, value in changes.items():
        setattr(policy, name, value)
    policy.full_clean()
    if policy.idle_payer is not None and policy.idle_payer.team_id != team.pk:
        raise ValidationError({"idle_payer": IDLE_PAYER_OTHER_TEAM.format(team=team)})
    after = {name: _plain(getattr(policy, name)) for name in changes}
    changed = [name for name in changes if before[name] != after[name]]
    if changed:
        policy.save(update_fields=[*changed, "updated_at"])
        billing_audit(action=POLICY_UPDATED, team=team, actor=actor, subject_id=policy.pk, reason=reason,
                      data={"before": {n: before[n] for n in changed}, "after": {n: after[n] for n in changed}})
    return policy


def _plain(value):
    """A setting as JSON for the audit trail."""
    if hasattr(value, "pk"):
        return value.pk
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    return value
