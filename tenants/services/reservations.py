"""The sweep: give back reservations whose request never settled (its process died).

A reservation is a row (tenants.models.QuotaReservation) from the gateway's reservation
statement until its settlement's. A row older than the longest possible request
(`reservation_max_age()`: the fair queue's wait, the upstream timeout and a margin for the
generation after the first byte) belongs to a request whose gateway process died after
PostgreSQL committed the reservation (the client got a 503 or lost its connection): the
sweep deletes it and subtracts it from the counters it was held on (never below zero), adds
it to the counter's reservations_swept/tokens_swept (the gateway's /metrics sums those), and
leaves an audit event per counter and a warning in the log.

Safe beside live traffic: rows are taken FOR UPDATE SKIP LOCKED (a row being settled right
now is skipped), and a settlement arriving after the sweep finds its row gone and releases
nothing (tenants.quota.settle_sql). Run twice, it gives back nothing twice.
"""
import logging
from collections import defaultdict
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone

from tenants.models import AuditEvent, QuotaCounter, QuotaReservation, TeamQuotaCounter

log = logging.getLogger("qwenhub.quota")

SWEEP_BATCH = 1000
SWEEP_REASON = "reservation older than {age:g} s: its request never settled (its gateway process died)"


def reservation_max_age() -> float:
    """Seconds a running request may hold its reservation: the queue's wait, the upstream's timeout, a margin."""
    return settings.QWENHUB_QUEUE_TIMEOUT + settings.QWENHUB_UPSTREAM_TIMEOUT + settings.QWENHUB_RESERVATION_MARGIN


def reservations_sweep(*, now: datetime | None = None, max_age: float | None = None,
                       using: str = "default") -> list[dict]:
    """Give back every reservation older than `max_age` seconds; return what was given back, per counter.

    (`using`: the database alias; the ledger's contract test sweeps its SQLite one too.)
    """
    now = now or timezone.now()
    age = reservation_max_age() if max_age is None else max_age
    cutoff = now - timedelta(seconds=age)
    swept = []
    while batch := _sweep_batch(cutoff, age, using):
        swept += batch
        if len(batch) < SWEEP_BATCH:
            break
    return swept


def _sweep_batch(cutoff: datetime, age: float, using: str) -> list[dict]:
    with transaction.atomic(using=using):
        rows = list(QuotaReservation.objects.using(using).select_for_update(skip_locked=True)
                    .filter(created_at__lt=cutoff).order_by("pk")
                    .values("pk", "counter_id", "team_counter_id", "tokens")[:SWEEP_BATCH])
        if not rows:
            return []
        QuotaReservation.objects.using(using).filter(pk__in=[row["pk"] for row in rows]).delete()
        members: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        teams: dict[int, int] = defaultdict(int)
        for row in rows:
            members[row["counter_id"]][0] += 1
            members[row["counter_id"]][1] += row["tokens"]
            if row["team_counter_id"] is not None:
                teams[row["team_counter_id"]] += row["tokens"]
        # What the counters still hold of it: the month's close may have given it back already.
        holding = (QuotaCounter.objects.using(using).select_for_update(no_key=True).filter(pk__in=members)
                   .order_by("pk").values_list("pk", "requests_reserved", "tokens_reserved"))
        for counter_id, requests_reserved, tokens_reserved in holding:
            requests, tokens = members[counter_id]
            members[counter_id] = [min(requests, requests_reserved), min(tokens, tokens_reserved)]
            QuotaCounter.objects.using(using).filter(pk=counter_id).update(
                requests_reserved=Greatest(F("requests_reserved") - requests, 0),
                tokens_reserved=Greatest(F("tokens_reserved") - tokens, 0),
                reservations_swept=F("reservations_swept") + members[counter_id][0],
                tokens_swept=F("tokens_swept") + members[counter_id][1])
        for team_counter_id, tokens in sorted(teams.items()):
            TeamQuotaCounter.objects.using(using).filter(pk=team_counter_id).update(
                tokens_reserved=Greatest(F("tokens_reserved") - tokens, 0))
        swept = []
        reason = SWEEP_REASON.format(age=age)
        counters = QuotaCounter.objects.using(using).filter(pk__in=members).select_related("member__team")
        for counter in counters.order_by("pk"):
            requests, tokens = members[counter.pk]
            if not (requests or tokens):
                continue  # given back already (the close): nothing to report
            data = {"period": counter.period_start.isoformat(), "counter_id": counter.pk,
                    "member_id": counter.member_id, "requests": requests, "tokens": tokens}
            # audit_record's event, on the swept database
            AuditEvent.objects.using(using).create(kind=AuditEvent.Kind.RESERVATIONS_RELEASED,
                                                   team=counter.member.team, member=counter.member,
                                                   subject_id=counter.pk, reason=reason, data=data)
            log.warning("swept stale reservations member_id=%s counter_id=%s period=%s requests=%s tokens=%s",
                        counter.member_id, counter.pk, data["period"], requests, tokens)
            swept.append(data)
        return swept
