"""Reads for the member's own pages: one member's quota, keys and history, nothing else."""
from dataclasses import dataclass

from tenants.models import ApiKey, AuditEvent, Member, QuotaCounter
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
