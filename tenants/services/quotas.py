"""Writes for quota counters: open a month, top up, reset, carry a changed quota into the month.

The rule itself (what is reserved, charged and refused, the statement that opens a month)
is tenants.quota, shared with the gateway.
"""
from django.db import connection, transaction
from django.db.models import F

from tenants import quota
from tenants.models import AuditEvent, Member, QuotaCounter, Team
from tenants.periods import period_start_for

QUOTA_AMOUNT_INVALID = "A top-up must add a positive number of requests or tokens."
QUOTA_UNLIMITED = "{member}'s {what} quota is unlimited this month: there is nothing to top up."
QUOTA_CHANGE_REASON = "monthly quota changed"


def quota_counter_open(*, member: Member, period_start=None) -> QuotaCounter:
    """Return the member's counter for the period, creating it with the member's quotas.

    The same statement as the gateway's (tenants.quota.OPEN_SQL): safe under concurrency,
    the unique (member, period) constraint decides the winner.
    """
    start = period_start or period_start_for(member.team.timezone)
    counter = QuotaCounter.objects.filter(member=member, period_start=start).first()
    if counter is None:
        with connection.cursor() as cursor:
            cursor.execute(quota.OPEN_SQL, quota.open_args(member_id=member.pk, start=start))
        counter = QuotaCounter.objects.get(member=member, period_start=start)
    return counter


def quota_counters_open_for_team(*, team: Team, period_start) -> int:
    """Open the month's counters of every active member (and the team cap's) in two statements.

    The monthly close calls it for the new month (the quota reset); members already opened
    are left as they are. Returns how many active members the team has.
    """
    with connection.cursor() as cursor:
        cursor.execute(quota.OPEN_TEAM_SQL, [period_start, team.pk])
        if team.token_cap is not None:
            cursor.execute(quota.TEAM_OPEN_SQL, quota.team_open_args(team_id=team.pk, start=period_start))
    return Member.objects.filter(team=team, is_active=True).count()


@transaction.atomic
def quota_counter_charge_imported(*, member: Member, requests: int) -> QuotaCounter:
    """Carry over requests already used this month in the system a team migrates from."""
    counter = quota_counter_open(member=member)
    if counter.request_limit is not None:
        requests = min(requests, counter.request_limit)
    QuotaCounter.objects.filter(pk=counter.pk).update(requests_used=F("requests_used") + requests)
    counter.refresh_from_db()
    return counter


@transaction.atomic(durable=True)
def quota_top_up(*, member: Member, requests: int = 0, tokens: int = 0, actor=None, reason: str = "") -> QuotaCounter:
    """Raise the member's limits for the current month only; next month starts from the member's quotas."""
    if requests < 0 or tokens < 0 or requests + tokens == 0:
        raise ValueError(QUOTA_AMOUNT_INVALID)
    counter = quota_counter_open(member=member)
    updates = {}
    if requests:
        if counter.request_limit is None:
            raise ValueError(QUOTA_UNLIMITED.format(member=member, what="request"))
        updates["request_limit"] = F("request_limit") + requests
    if tokens:
        if counter.token_limit is None:
            raise ValueError(QUOTA_UNLIMITED.format(member=member, what="token"))
        updates["token_limit"] = F("token_limit") + tokens
    QuotaCounter.objects.filter(pk=counter.pk).update(**updates)
    counter.refresh_from_db()
    AuditEvent.objects.create(
        kind=AuditEvent.Kind.QUOTA_TOPPED_UP, team=member.team, member=member, actor=actor, subject_id=counter.pk,
        reason=reason, data={"period": counter.period_start.isoformat(), "requests": requests, "tokens": tokens,
                             "request_limit": counter.request_limit, "token_limit": counter.token_limit},
    )
    return counter


@transaction.atomic(durable=True)
def quota_reset(*, member: Member, actor=None, reason: str = "") -> QuotaCounter:
    """Give the member a full fresh allowance for the rest of the month.

    Usage already recorded stays (it is billed); the limits become used (and in flight) + quota.
    """
    counter = quota_counter_open(member=member)
    updates = {}
    # Requests in flight will be charged when they settle: count them as used already.
    if member.request_quota is not None:
        updates["request_limit"] = F("requests_used") + F("requests_reserved") + member.request_quota
    if member.token_quota is not None:
        updates["token_limit"] = F("tokens_used") + F("tokens_reserved") + member.token_quota
    if updates:
        QuotaCounter.objects.filter(pk=counter.pk).update(**updates)
    counter.refresh_from_db()
    AuditEvent.objects.create(
        kind=AuditEvent.Kind.QUOTA_RESET, team=member.team, member=member, actor=actor, subject_id=counter.pk,
        reason=reason, data={"period": counter.period_start.isoformat(),
                             "request_limit": counter.request_limit, "token_limit": counter.token_limit},
    )
    return counter


def _carried_limit(limit: int | None, old_quota: int | None, new_quota: int | None, floor: int) -> int | None:
    if new_quota is None:
        return None
    top_ups = limit - old_quota if limit is not None and old_quota is not None and limit > old_quota else 0
    return max(new_quota + top_ups, floor)


def quota_counter_carry(*, member: Member, old_request_quota: int | None,
                        old_token_quota: int | None) -> tuple[QuotaCounter | None, dict | None]:
    """Move the open month's limits after the member's quotas changed; return the counter and audit data.

    The audit data is None when nothing moved. Callers hold a transaction (the counter is locked).
    """
    start = period_start_for(member.team.timezone)
    counter = (QuotaCounter.objects.select_for_update(no_key=True)
               .filter(member=member, period_start=start).first())
    if counter is None or (old_request_quota, old_token_quota) == (member.request_quota, member.token_quota):
        return counter, None
    counter.request_limit = _carried_limit(counter.request_limit, old_request_quota, member.request_quota,
                                           counter.requests_used + counter.requests_reserved)
    counter.token_limit = _carried_limit(counter.token_limit, old_token_quota, member.token_quota,
                                         counter.tokens_used + counter.tokens_reserved)
    counter.save(update_fields=["request_limit", "token_limit"])
    data = {"period": start.isoformat(), "request_quota": member.request_quota, "token_quota": member.token_quota,
            "request_limit": counter.request_limit, "token_limit": counter.token_limit}
    return counter, data


@transaction.atomic
def quota_counter_apply_quota_change(*, member: Member, old_request_quota: int | None,
                                     old_token_quota: int | None, actor=None) -> QuotaCounter | None:
    """Carry a member's changed monthly quotas into the month already open, keeping its top-ups.

    The new limit is quota + this month's top-ups, never below what is used or in flight
    (a lowered quota can exhaust the month, not undo it). Without an open counter there is
    nothing to do: the month's counter will copy the new quotas when it opens.
    (member_update does this itself, in the same transaction as the quota change.)
    """
    counter, data = quota_counter_carry(member=member, old_request_quota=old_request_quota,
                                        old_token_quota=old_token_quota)
    if data is not None:
        AuditEvent.objects.create(
            kind=AuditEvent.Kind.MEMBER_UPDATED, team=member.team, member=member, actor=actor, subject_id=member.pk,
            reason=QUOTA_CHANGE_REASON, data=data,
        )
    return counter
