"""Reads: the member's own pages (one member's quota, keys and history) and the admin's lists."""
from collections.abc import Iterable
from dataclasses import dataclass

from django.db.models import Count, QuerySet

from tenants.models import ApiKey, AuditEvent, Member, QuotaCounter, Team
from tenants.periods import period_reset_at, period_start_for


@dataclass(frozen=True)
class QuotaView:
    period_start: object
    resets_at: object
    requests_used: int
    request_limit: int | None
    tokens_used: int
    token_limit: int | None


def member_quota_this_month(*, member: Member) -> QuotaView:
    """Return this month's use and limits (the member's quotas if the month has no counter yet)."""
    start = period_start_for(member.team.timezone)
    counter = QuotaCounter.objects.filter(member=member, period_start=start).first()
    return QuotaView(
        period_start=start,
        resets_at=period_reset_at(member.team.timezone, start),
        requests_used=counter.requests_used if counter else 0,
        request_limit=counter.request_limit if counter else member.request_quota,
        tokens_used=counter.tokens_used if counter else 0,
        token_limit=counter.token_limit if counter else member.token_quota,
    )


def member_keys(*, member: Member):
    return ApiKey.objects.filter(member=member).order_by("-created_at").only(
        "prefix", "label", "created_at", "last_used_at", "expires_at", "revoked_at")


def member_history(*, member: Member, limit: int = 50):
    """The audit events about this member (quota top-ups and resets, keys), newest first."""
    return AuditEvent.objects.filter(member=member).select_related("actor").order_by("-created_at")[:limit]


def memberships_for_user(*, user):
    return Member.objects.filter(user=user, is_active=True).select_related("team").order_by("team__slug")


# --- Admin lists ------------------------------------------------------------------------

def team_list() -> QuerySet[Team]:
    """Teams, each with member_count (one query for a whole page)."""
    return Team.objects.annotate(member_count=Count("members"))


def member_list(*, team: Team | None = None, ids: Iterable[int] | None = None) -> QuerySet[Member]:
    """Members with their user and team (their name is user@team), by username."""
    members = Member.objects.select_related("user", "team")
    if team is not None:
        members = members.filter(team=team)
    if ids is not None:
        members = members.filter(pk__in=ids)
    return members.order_by("user__username", "pk")


def member_list_for_counters(*, counters: QuerySet[QuotaCounter]) -> list[Member]:
    """The members whose quota counters these are, once each, in id order."""
    return list(Member.objects.select_related("user", "team")
                .filter(pk__in=counters.values("member_id")).order_by("pk"))


def api_key_list(*, ids: Iterable[int] | None = None) -> QuerySet[ApiKey]:
    """Keys with their member, user and team; the hash is never loaded (lists must not show it)."""
    keys = ApiKey.objects.select_related("member__user", "member__team").defer("key_hash")
    if ids is not None:
        keys = keys.filter(pk__in=ids)
    return keys


# --- The management API ------------------------------------------------------------------

def api_key_for_authentication(*, key_hash: str) -> ApiKey | None:
    """The key with this hash, its member, user and team (one query), or None; revoked keys included."""
    return (ApiKey.objects.select_related("member__user", "member__team").defer("key_hash")
            .filter(key_hash=key_hash).first())


def membership_for_user(*, user, team_slug: str) -> Member | None:
    """The user's active membership of the team with this slug, or None."""
    return memberships_for_user(user=user).select_related("user").filter(team__slug=team_slug).first()


def member_key_list(*, member: Member) -> QuerySet[ApiKey]:
    """The member's own keys, newest first (never the hash)."""
    return ApiKey.objects.filter(member=member).defer("key_hash").select_related("member__team").order_by(
        "-created_at", "-pk")


def team_audit_events(*, team: Team) -> QuerySet[AuditEvent]:
    """The team's audit trail with actor and member, newest first."""
    return (AuditEvent.objects.filter(team=team).select_related("actor", "member__user")
            .order_by("-created_at", "-pk"))
