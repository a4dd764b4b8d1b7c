"""Writes for quota counters. Billing periods and invoices come next."""
from django.db import IntegrityError, transaction
from django.db.models import F

from billing.models import QuotaCounter
from billing.periods import period_start_for
from tenants.models import AuditEvent, Member

QUOTA_AMOUNT_INVALID = "A top-up must add a positive number of requests or tokens."
QUOTA_UNLIMITED = "{member}'s {what} quota is unlimited this month: there is nothing to top up."


def quota_counter_open(*, member: Member, period_start=None) -> QuotaCounter:
    """Return the member's counter for the period, creating it with the member's quotas.

    Safe under concurrency: the unique (member, period) constraint decides the winner.
    """
    start = period_start or period_start_for(member.team.timezone)
    defaults = {"request_limit": member.request_quota, "token_limit": member.token_quota}
    try:
        with transaction.atomic():
            counter, _ = QuotaCounter.objects.get_or_create(member=member, period_start=start, defaults=defaults)
    except IntegrityError:
        counter = QuotaCounter.objects.get(member=member, period_start=start)
    return counter


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

    Usage already recorded stays (it is billed); the limits become used + quota.
    """
    counter = quota_counter_open(member=member)
    updates = {}
    if member.request_quota is not None:
        updates["request_limit"] = F("requests_used") + member.request_quota
    if member.token_quota is not None:
        updates["token_limit"] = F("tokens_used") + member.token_quota
    if updates:
        QuotaCounter.objects.filter(pk=counter.pk).update(**updates)
    counter.refresh_from_db()
    AuditEvent.objects.create(
        kind=AuditEvent.Kind.QUOTA_RESET, team=member.team, member=member, actor=actor, subject_id=counter.pk,
        reason=reason, data={"period": counter.period_start.isoformat(),
                             "request_limit": counter.request_limit, "token_limit": counter.token_limit},
    )
    return counter
