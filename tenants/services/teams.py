"""Writes for teams and members. Every state change leaves an AuditEvent."""
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.translation import gettext_lazy as _

from tenants.models import AuditEvent, Member, Team
from tenants.services.audit import audit_record as _audit
from tenants.services.audit import fields_apply, update_fields
from tenants.services.quotas import QUOTA_CHANGE_REASON, quota_counter_carry

User = get_user_model()

TEAM_EXISTS = "A team with slug {slug!r} already exists."
TEAM_UNKNOWN = "No team with slug {slug!r}."
USER_EXISTS = _("User {username!r} already exists.")
USER_UNKNOWN = "No member with username {username!r}."
USER_AMBIGUOUS = "User {username!r} belongs to several teams: name one with --team."
COST_INVALID = "Monthly cost must be a non-negative amount such as 3000 or 2999.50."
MEMBER_EXISTS = _("{user} is already a member of {team}.")
MEMBER_OTHER_TEAM = _("{member} is not a member of team {team}.")

# What team_update and member_update may change. A member's user and team are not edits:
# moving a member (and their usage history) is a different operation.
TEAM_UPDATE_FIELDS = ("slug", "name", "timezone", "currency", "monthly_cost", "token_cap")
MEMBER_UPDATE_FIELDS = ("role", "request_quota", "token_quota", "requests_per_minute", "tokens_per_minute",
                        "max_concurrent_requests", "weight", "is_active", "allowed_models")


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
                monthly_cost="0", token_cap: int | None = None, actor=None) -> Team:
    if Team.objects.filter(slug=slug).exists():
        raise ValidationError(TEAM_EXISTS.format(slug=slug))
    team = Team(slug=slug, name=name, timezone=timezone_name, currency=currency.upper(),
                monthly_cost=parse_money(monthly_cost), token_cap=token_cap)
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


def _team_change(*, team: Team, data: Mapping[str, object]) -> tuple[Team, dict]:
    locked = Team.objects.select_for_update(no_key=True).get(pk=team.pk)
    data = dict(data)
    if isinstance(data.get("currency"), str):
        data["currency"] = data["currency"].upper()
    if "monthly_cost" in data:
        data["monthly_cost"] = parse_money(data["monthly_cost"])
    changes = fields_apply(instance=locked, data=data, fields=TEAM_UPDATE_FIELDS)
    if changes:
        # Uniqueness is checked only when the slug moves; the check constraints mirror the field validators.
        locked.full_clean(validate_unique="slug" in changes, validate_constraints=False)
        locked.save(update_fields=update_fields(changes, locked))
    return locked, changes


def _allowed_models_apply(member: Member, models: Iterable) -> dict | None:
    new_ids = {int(getattr(m, "pk", m)) for m in models}  # model rows or their ids
    old_ids = set(member.allowed_models.values_list("pk", flat=True))
    if new_ids == old_ids:
        return None
    # The catalog's model, reached through the relation: tenants imports no other app.
    catalog = Member.allowed_models.field.related_model
    names = dict(catalog.objects.filter(pk__in=old_ids | new_ids).values_list("pk", "name"))
    if len(names) < len(old_ids | new_ids):
        raise ValidationError({"allowed_models": "Unknown model."})
    member.allowed_models.set(sorted(new_ids))
    return {"old": sorted(names[i] for i in old_ids), "new": sorted(names[i] for i in new_ids)}


@transaction.atomic
def _member_change(*, member: Member, data: Mapping[str, object], team: Team | None = None, actor=None,
                   reason: str = "") -> Member:
    """Apply data to the member (row locked); carry changed quotas into the open month; audit once."""
    locked = (Member.objects.select_for_update(no_key=True, of=("self",)).select_related("team", "user")
              .get(pk=member.pk))
    if team is not None:
        if locked.team_id != team.pk:
            raise ValidationError(MEMBER_OTHER_TEAM.format(member=locked, team=team))
        locked.team = team  # the team as just changed (its time zone decides the open month)
    old_request_quota, old_token_quota = locked.request_quota, locked.token_quota
    data = dict(data)
    allowed_models = data.pop("allowed_models", None)
    changes = fields_apply(instance=locked, data=data, fields=MEMBER_UPDATE_FIELDS)
    if changes:
        # team and user do not change here: no foreign key, uniqueness or constraint queries needed
        # (the check constraints mirror the field validators that clean_fields runs).
        locked.full_clean(exclude=["team", "user"], validate_unique=False, validate_constraints=False)
        locked.save(update_fields=update_fields(changes, locked))
    if allowed_models is not None:
        models_change = _allowed_models_apply(locked, allowed_models)
        if models_change:
            changes["allowed_models"] = models_change
    if not changes:
        return locked
    carried = None
    if (old_request_quota, old_token_quota) != (locked.request_quota, locked.token_quota):
        _counter, carried = quota_counter_carry(member=locked, old_request_quota=old_request_quota,
                                                old_token_quota=old_token_quota)
    _audit(kind=AuditEvent.Kind.MEMBER_UPDATED, team=locked.team, member=locked, actor=actor, subject_id=locked.pk,
           reason=reason or (QUOTA_CHANGE_REASON if carried else ""), data={"changed": changes, **(carried or {})})
    return locked


@transaction.atomic(durable=True)
def team_update(*, team: Team, data: Mapping[str, object],
                members: Sequence[tuple[Member, Mapping[str, object]]] = (), actor=None, reason: str = "") -> Team:
    """Change the team's fields (TEAM_UPDATE_FIELDS) and, in the same transaction, its members' (member_update's).

    Records TEAM_UPDATED with the changed fields (old and new), and one MEMBER_UPDATED per changed
    member; a call that changes nothing writes nothing.
    """
    team, changes = _team_change(team=team, data=data)
    if changes:
        _audit(kind=AuditEvent.Kind.TEAM_UPDATED, team=team, actor=actor, subject_id=team.pk, reason=reason,
               data={"changed": changes})
    for member, member_data in members:
        _member_change(member=member, data=member_data, team=team, actor=actor, reason=reason)
    return team


@transaction.atomic(durable=True)
def member_update(*, member: Member, data: Mapping[str, object], actor=None, reason: str = "") -> Member:
    """Change a member's role, quotas, limits, weight, active flag or allowed models (MEMBER_UPDATE_FIELDS).

    A changed monthly quota applies to the month already open, in the same transaction
    (quota + this month's top-ups, never below what is used or in flight; see
    quota_counter_apply_quota_change). One MEMBER_UPDATED event holds the changed fields and,
    when the open month moved, its new limits. A call that changes nothing writes nothing.
    """
    return _member_change(member=member, data=data, actor=actor, reason=reason)


@transaction.atomic(durable=True)
def member_create(*, team: Team, user, role: str = Member.Role.MEMBER, request_quota: int | None = None,
                  token_quota: int | None = None, requests_per_minute: int | None = None,
                  tokens_per_minute: int | None = None, max_concurrent_requests: int | None = None,
                  weight: int = 1, is_active: bool = True, allowed_models: Iterable = (),
                  actor=None, reason: str = "") -> Member:
    """Make an existing user a member of team (member_add creates the user as well)."""
    if Member.objects.filter(team=team, user=user).exists():
        raise ValidationError(MEMBER_EXISTS.format(user=user, team=team))
    member = Member(team=team, user=user, role=role, request_quota=request_quota, token_quota=token_quota,
                    requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute,
                    max_concurrent_requests=max_concurrent_requests, weight=weight, is_active=is_active)
    member.full_clean()
    member.save()
    models = list(allowed_models)
    if models:
        member.allowed_models.set(models)
    _audit(kind=AuditEvent.Kind.MEMBER_ADDED, team=team, member=member, actor=actor, subject_id=member.pk,
           reason=reason, data={"role": role, "request_quota": request_quota, "token_quota": token_quota})
    return member
