"""Writes for teams, members and keys. Every state change leaves an AuditEvent."""
import json
from datetime import timedelta
from decimal import Decimal, InvalidOperation

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from tenants.keys import api_key_display_prefix, api_key_generate, api_key_hash, api_key_is_plausible
from tenants.models import ApiKey, AuditEvent, Member, Team

User = get_user_model()

TEAM_EXISTS = "A team with slug {slug!r} already exists."
TEAM_UNKNOWN = "No team with slug {slug!r}."
USER_EXISTS = "User {username!r} already exists."
USER_UNKNOWN = "No member with username {username!r}."
USER_AMBIGUOUS = "User {username!r} belongs to several teams: name one with --team."
KEY_UNKNOWN = "No API key with prefix {prefix!r}."
KEY_AMBIGUOUS = "Prefix {prefix!r} matches {count} keys: give more characters."
KEY_ALREADY_REVOKED = "Key {prefix}… is already revoked."
COST_INVALID = "Monthly cost must be a non-negative amount such as 3000 or 2999.50."
IMPORT_NOT_OBJECT = "The import file must hold a JSON object: {\"alice\": {\"key\": \"sk-…\", \"quota\": 1000, \"used\": 0}}."
IMPORT_ENTRY_INVALID = "Entry {name!r}: {problem}."
IMPORT_DUPLICATE_NAME = "The name {name!r} appears more than once in the import file."
IMPORT_KEY_EXISTS = "Entry {name!r}: that key is already registered."


def _audit(*, kind: str, team: Team | None = None, member: Member | None = None, actor=None,
           subject_id: int | None = None, reason: str = "", data: dict | None = None) -> AuditEvent:
    return AuditEvent.objects.create(
        kind=kind, team=team, member=member, actor=actor, subject_id=subject_id, reason=reason, data=data or {}
    )


def parse_money(value) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValidationError(COST_INVALID) from exc
    if not amount.is_finite() or amount < 0 or amount != amount.quantize(Decimal("0.01")):
        raise ValidationError(COST_INVALID)
    return amount


@transaction.atomic(durable=True)
def team_create(*, slug: str, name: str, timezone_name: str = "UTC", currency: str = "CNY",
                monthly_cost="0", actor=None) -> Team:
    if Team.objects.filter(slug=slug).exists():
        raise ValidationError(TEAM_EXISTS.format(slug=slug))
    team = Team(slug=slug, name=name, timezone=timezone_name, currency=currency.upper(),
                monthly_cost=parse_money(monthly_cost))
    team.full_clean()
    team.save()
    _audit(kind=AuditEvent.Kind.TEAM_CREATED, team=team, actor=actor, subject_id=team.pk)
    return team


def team_get(*, slug: str) -> Team:
    try:
        return Team.objects.get(slug=slug)
    except Team.DoesNotExist:
        raise ValidationError(TEAM_UNKNOWN.format(slug=slug)) from None


@transaction.atomic
def member_add(*, team: Team, username: str, email: str = "", role: str = Member.Role.MEMBER,
               request_quota: int | None = None, token_quota: int | None = None,
               password: str | None = None, actor=None, reason: str = "") -> Member:
    """Create a user and make them a member of team (quotas left out are unlimited)."""
    if User.objects.filter(username=username).exists():
        raise ValidationError(USER_EXISTS.format(username=username))
    user = User(username=username, email=email, is_staff=False)
    if password:
        user.set_password(password)
    else:
        user.set_unusable_password()
    user.full_clean()
    user.save()
    member = Member(team=team, user=user, role=role, request_quota=request_quota, token_quota=token_quota)
    member.full_clean()
    member.save()
    _audit(kind=AuditEvent.Kind.MEMBER_ADDED, team=team, member=member, actor=actor, subject_id=member.pk,
           reason=reason, data={"role": role, "request_quota": request_quota, "token_quota": token_quota})
    return member


def member_get(*, username: str, team_slug: str | None = None) -> Member:
    members = list(Member.objects.select_related("team", "user").filter(user__username=username))
    if team_slug:
        members = [m for m in members if m.team.slug == team_slug]
    if not members:
        raise ValidationError(USER_UNKNOWN.format(username=username))
    if len(members) > 1:
        raise ValidationError(USER_AMBIGUOUS.format(username=username))
    return members[0]


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
    from billing.services import quota_counter_charge_imported  # billing owns the counters

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

