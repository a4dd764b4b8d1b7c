"""Writes for teams and members. Every state change leaves an AuditEvent."""
from decimal import Decimal, InvalidOperation

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import transaction

from tenants.models import AuditEvent, Member, Team
from tenants.services.audit import audit_record as _audit

User = get_user_model()

TEAM_EXISTS = "A team with slug {slug!r} already exists."
TEAM_UNKNOWN = "No team with slug {slug!r}."
USER_EXISTS = "User {username!r} already exists."
USER_UNKNOWN = "No member with username {username!r}."
USER_AMBIGUOUS = "User {username!r} belongs to several teams: name one with --team."
COST_INVALID = "Monthly cost must be a non-negative amount such as 3000 or 2999.50."


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
