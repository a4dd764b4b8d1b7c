"""The audit trail: every state change a service makes leaves one AuditEvent."""
from tenants.models import AuditEvent, Member, Team


def audit_record(*, kind: str, team: Team | None = None, member: Member | None = None, actor=None,
                 subject_id: int | None = None, reason: str = "", data: dict | None = None) -> AuditEvent:
    return AuditEvent.objects.create(
        kind=kind, team=team, member=member, actor=actor, subject_id=subject_id, reason=reason, data=data or {}
    )
