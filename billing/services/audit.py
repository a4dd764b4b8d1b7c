"""Billing's audit events.

tenants.models.AuditEvent has no billing kinds yet (and tenants' choices are another
engineer's to change, with a migration there), so billing records its events under the
closest existing kind and names what happened in `data["action"]`: the release of stuck
reservations is a QUOTA_RESET of those counters, everything else a MEMBER_UPDATED (with no
member for a team-wide event). When billing kinds exist, only this module changes.
"""
from tenants.models import AuditEvent, Member, Team

PERIOD_CLOSED = "billing.period_closed"
RESERVATIONS_RELEASED = "billing.reservations_released"
ACTUAL_COST_SET = "billing.actual_cost_set"
PERIOD_FINALIZED = "billing.period_finalized"
INVOICE_ADJUSTED = "billing.invoice_adjusted"
POLICY_CREATED = "billing.policy_created"
POLICY_UPDATED = "billing.policy_updated"

_KIND = {RESERVATIONS_RELEASED: AuditEvent.Kind.QUOTA_RESET}


def billing_audit(*, action: str, team: Team, member: Member | None = None, member_id: int | None = None,
                  actor=None, subject_id: int | None = None, reason: str = "", data: dict | None = None) -> AuditEvent:
    return AuditEvent.objects.create(
        kind=_KIND.get(action, AuditEvent.Kind.MEMBER_UPDATED), team=team,
        member_id=member.pk if member is not None else member_id, actor=actor, subject_id=subject_id,
        reason=reason[:500], data={"action": action, **(data or {})})
