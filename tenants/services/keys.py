"""Writes for API keys: issue (the raw key is returned once), revoke, import from another system."""
import json
from collections.abc import Mapping
from datetime import timedelta

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.translation import gettext_lazy as _
from django.utils import timezone

from tenants.keys import api_key_display_prefix, api_key_generate, api_key_hash, api_key_is_plausible
from tenants.models import ApiKey, AuditEvent, Member, Team
from tenants.services.audit import audit_record as _audit
from tenants.services.audit import fields_apply, update_fields
from tenants.services.quotas import quota_counter_charge_imported
from tenants.services.teams import member_add

KEY_UNKNOWN = _("No API key with prefix {prefix!r}.")
KEY_AMBIGUOUS = _("Prefix {prefix!r} matches {count} keys: give more characters.")
KEY_ALREADY_REVOKED = _("Key {prefix}… is already revoked.")
IMPORT_NOT_OBJECT = "The import file must hold a JSON object: {\"alice\": {\"key\": \"sk-…\", \"quota\": 1000, \"used\": 0}}."
IMPORT_ENTRY_INVALID = "Entry {name!r}: {problem}."
IMPORT_DUPLICATE_NAME = "The name {name!r} appears more than once in the import file."
IMPORT_KEY_EXISTS = "Entry {name!r}: that key is already registered."

# A key's secret, owner and dates are not edits: revoke it and issue another.
API_KEY_UPDATE_FIELDS = ("label",)


def _api_key_store(*, member: Member, raw: str, label: str, expires_at=None, kind: str, actor=None) -> ApiKey:
    key = ApiKey(member=member, label=label, prefix=api_key_display_prefix(raw),
                 key_hash=api_key_hash(raw), expires_at=expires_at)
    key.full_clean(exclude=["key_hash"])
    key.save()
    _audit(kind=kind, team=member.team, member=member, actor=actor, subject_id=key.pk,
           data={"prefix": key.prefix, "label": label})
    return key


@transaction.atomic
def api_key_issue(*, member: Member, label: str = "", expires_days: int | None = None, actor=None) -> tuple[ApiKey, str]:
    """Create a key for member; return it and the raw key, which is shown once and never stored."""
    raw = api_key_generate()
    expires_at = timezone.now() + timedelta(days=expires_days) if expires_days else None
    key = _api_key_store(member=member, raw=raw, label=label, expires_at=expires_at,
                         kind=AuditEvent.Kind.KEY_ISSUED, actor=actor)
    return key, raw


def api_key_get_by_prefix(*, prefix: str) -> ApiKey:
    keys = list(ApiKey.objects.select_related("member__team").filter(prefix__startswith=prefix)[:5]) if prefix else []
    if not keys:
        raise ValidationError(KEY_UNKNOWN.format(prefix=prefix))
    if len(keys) > 1:
        raise ValidationError(KEY_AMBIGUOUS.format(prefix=prefix, count=len(keys)))
    return keys[0]


@transaction.atomic
def api_key_revoke(*, key: ApiKey, actor=None, reason: str = "") -> ApiKey:
    """Revoke key; gateways stop accepting it within QWENHUB_KEY_CACHE_SECONDS."""
    updated = ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    if not updated:
        raise ValidationError(KEY_ALREADY_REVOKED.format(prefix=key.prefix))
    key.refresh_from_db(fields=["revoked_at"])
    _audit(kind=AuditEvent.Kind.KEY_REVOKED, team=key.member.team, member=key.member, actor=actor,
           subject_id=key.pk, reason=reason, data={"prefix": key.prefix})
    return key


@transaction.atomic(durable=True)
def api_key_update(*, key: ApiKey, data: Mapping[str, object], actor=None, reason: str = "") -> ApiKey:
    """Change a key's label (API_KEY_UPDATE_FIELDS); a call that changes nothing writes nothing."""
    locked = ApiKey.objects.select_for_update(no_key=True, of=("self",)).select_related("member__team").defer(
        "key_hash").get(pk=key.pk)
    changes = fields_apply(instance=locked, data=data, fields=API_KEY_UPDATE_FIELDS)
    if changes:
        locked.full_clean(exclude=["member", "key_hash"], validate_unique=False, validate_constraints=False)
        locked.save(update_fields=update_fields(changes, locked))
        _audit(kind=AuditEvent.Kind.KEY_UPDATED, team=locked.member.team, member=locked.member, actor=actor,
               subject_id=locked.pk, reason=reason, data={"prefix": locked.prefix, "changed": changes})
    return locked


def _import_entry(name, entry) -> tuple[str, int | None, int]:
    if not isinstance(name, str) or not name:
        raise ValidationError(IMPORT_ENTRY_INVALID.format(name=name, problem="the name must be a non-empty string"))
    if not isinstance(entry, dict):
        raise ValidationError(IMPORT_ENTRY_INVALID.format(name=name, problem="expected an object with key, quota and used"))
    raw = entry.get("key")
    if not isinstance(raw, str) or not api_key_is_plausible(raw):
        raise ValidationError(IMPORT_ENTRY_INVALID.format(
            name=name, problem="'key' must be a string of 8 to 200 printable characters without spaces"))
    quota, used = entry.get("quota"), entry.get("used", 0)
    for field, value in (("quota", quota), ("used", used)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValidationError(IMPORT_ENTRY_INVALID.format(
                name=name, problem=f"'{field}' must be a non-negative whole number or null"))
    return raw, quota, used or 0


def _import_object(pairs: list) -> dict:
    # json.loads keeps only the last of duplicate names, which would silently drop a member's key.
    seen = set()
    for name, _ in pairs:
        if name in seen:
            raise ValidationError(IMPORT_DUPLICATE_NAME.format(name=name))
        seen.add(name)
    return dict(pairs)


@transaction.atomic(durable=True)
def api_keys_import(*, team: Team, text: str, actor=None) -> list[Member]:
    """Import members and their existing keys from a plain {name: {key, quota, used}} file.

    All or nothing: any invalid entry aborts the import before anything is written.
    The old keys keep working (stored hashed only); "quota" becomes the monthly
    request quota and "used" is charged to the current month's counter.
    """
    try:
        data = json.loads(text, object_pairs_hook=_import_object)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"The import file is not valid JSON: {exc.msg} (line {exc.lineno}).") from exc
    if not isinstance(data, dict) or not data:
        raise ValidationError(IMPORT_NOT_OBJECT)
    entries = [(name, *_import_entry(name, entry)) for name, entry in data.items()]
    seen: set[str] = set()
    for name, raw, _quota, _used in entries:
        digest = api_key_hash(raw)
        if digest in seen or ApiKey.objects.filter(key_hash=digest).exists():
            raise ValidationError(IMPORT_KEY_EXISTS.format(name=name))
        seen.add(digest)
    members = []
    for name, raw, quota, used in entries:
        member = member_add(team=team, username=name, request_quota=quota, actor=actor, reason="imported")
        _api_key_store(member=member, raw=raw, label="imported", kind=AuditEvent.Kind.KEY_IMPORTED, actor=actor)
        if used:
            quota_counter_charge_imported(member=member, requests=used)
        members.append(member)
    return members

