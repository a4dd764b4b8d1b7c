"""Billing's audit events: one AuditEvent kind per billing action (the trail lives in tenants).

`data["action"]` repeats the action's name, so the history pages can tell billing's events
apart without knowing every kind.
"""
from tenants.models import AuditEvent, Member, Team

PERIOD_CLOSED = "billing.period_closed"
RESERVATIONS_RELEASED = "billing.reservations_released"
ACTUAL_COST_SET = "billing.actual_cost_set"
PERIOD_FINALIZED = "billing.period_finalized"
INVOICE_ADJUSTED = "billing.invoice_adjusted"
POLICY_CREATED = "billing.policy_created"
POLICY_UPDATED = "billing.policy_updated"
STATEMENT_RESENT = "billing.statement_resent"

_KIND = {
    PERIOD_CLOSED: AuditEvent.Kind.PERIOD_CLOSED,
    RESERVATIONS_RELEASED: AuditEvent.Kind.RESERVATIONS_RELEASED,
    ACTUAL_COST_SET: AuditEvent.Kind.ACTUAL_COST_SET,
    PERIOD_FINALIZED: AuditEvent.Kind.PERIOD_FINALIZED,
    INVOICE_ADJUSTED: AuditEvent.Kind.INVOICE_ADJUSTED,
    POLICY_CREATED: AuditEvent.Kind.BILLING_POLICY_CREATED,
    POLICY_UPDATED: AuditEvent.Kind.BILLING_POLICY_UPDATED,
    STATEMENT_RESENT: AuditEvent.Kind.STATEMENT_RESENT,
}


def billing_audit(*, action: str, team: Team, member: Member | None = None, member_id: int | None = None,
                  actor=None, subject_id: int | None = None, reason: str = "", data: dict | None = None) -> AuditEvent:
    return AuditEvent.objects.create(
        kind=_KIND[action], team=team,
        member_id=member.pk if member is not None else member_id, actor=actor, subject_id=subject_id,
        reason=reason[:500], data={"action": action, **(data or {})})
