"""The audit trail: every state change a service makes leaves one AuditEvent."""
from collections.abc import Collection, Iterable, Mapping
from datetime import date, datetime
from decimal import Decimal

from django.db import models

from tenants.models import AuditEvent, Member, Team

FIELDS_UNKNOWN = "{model} has no editable field(s) {fields}."


def audit_record(*, kind: str, team: Team | None = None, member: Member | None = None, actor=None,
                 subject_id: int | None = None, reason: str = "", data: dict | None = None) -> AuditEvent:
    return AuditEvent.objects.create(
        kind=kind, team=team, member=member, actor=actor, subject_id=subject_id, reason=reason, data=data or {}
    )


def audit_value(value):
    """Return value as AuditEvent.data can hold it (JSON): amounts as strings, rows by name."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, models.Model):
        return str(value)
    return value


def fields_apply(*, instance: models.Model, data: Mapping[str, object], fields: Collection[str],
                 secret_fields: Collection[str] = ()) -> dict[str, object]:
    """Set data's values on instance; return the audit form of what changed.

    Only fields in `fields` may be set (anything else is a programming error, not user input).
    A changed field becomes {"old": …, "new": …}; a changed secret only "<field> changed",
    so its value never reaches the audit trail.
    """
    unknown = set(data) - set(fields)
    if unknown:
        raise TypeError(FIELDS_UNKNOWN.format(model=type(instance).__name__, fields=", ".join(sorted(unknown))))
    changes: dict[str, object] = {}
    for field, new in data.items():
        old = getattr(instance, field)
        if old == new:
            continue
        setattr(instance, field, new)
        changes[field] = (f"{field} changed" if field in secret_fields
                          else {"old": audit_value(old), "new": audit_value(new)})
    return changes


def update_fields(changes: Iterable[str], instance: models.Model) -> list[str]:
    """The update_fields for saving changes (plus updated_at where the model keeps one)."""
    names = list(changes)
    if any(f.name == "updated_at" for f in instance._meta.concrete_fields):
        names.append("updated_at")
    return names
