"""Reconciliation: do the quota counters and an upstream's own metrics agree with the usage rows?

Reads only. For one team and month (the team's calendar month):

- per member: the counter's ``requests_used``/``tokens_used`` against the usage rows (a row
  counts a request if it was answered or used tokens: tenants.quota.charged_requests), and its
  ``requests_reserved``/``tokens_reserved`` against the reservation rows of requests in flight
  (tenants.models.QuotaReservation), none of them older than the longest possible request
  (older ones belong to dead processes: run the sweep);
- the team's cap counter the same way (its tokens), if it has one;
- with an upstream's ``/metrics`` (vLLM, or the simulator): vLLM's ``vllm:generation_tokens_total``
  is a counter since the server started, so it is compared over a window between two scrapes:
  a baseline saved earlier (``metrics_baseline``) and one taken now; the usage rows started in
  that window (of that upstream, all teams: vLLM counts every team's tokens) must sum to the
  same completion tokens. Take both scrapes while the upstream is idle (a request running
  across either end counts on one side only); ``tolerance`` allows that many tokens of difference.
"""
import json
import urllib.request
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from django.db.models import Count, Q, Sum
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from billing.models import UsageRecord
from tenants import quota
from tenants.models import QuotaCounter, QuotaReservation, Team, TeamQuotaCounter
from tenants.services.reservations import reservation_max_age

GENERATION_TOKENS = "vllm:generation_tokens_total"


@dataclass(frozen=True)
class Mismatch:
    what: str  # e.g. "alice tokens_used"
    expected: int | str  # what the usage rows (or the reservation rows) say
    actual: int | str  # what the counter (or the upstream) says

    def __str__(self) -> str:
        return f"{self.what}: expected {self.expected}, found {self.actual}"


def _charged() -> Q:
    return Q(status__in=quota.ANSWERED_STATUSES) | Q(total_tokens__gt=0)


def counters_reconcile(*, team: Team, start: date, now: datetime | None = None) -> list[Mismatch]:
    """What the team's counters of the month say that the usage and reservation rows do not."""
    now = now or timezone.now()
    cutoff = now - timezone.timedelta(seconds=reservation_max_age())
    rows = {r["member_id"]: r for r in UsageRecord.objects.filter(team=team, period_start=start)
            .values("member_id").annotate(requests=Count("pk", filter=_charged()), tokens=Sum("total_tokens"))}
    held = {r["counter_id"]: r for r in QuotaReservation.objects.filter(counter__member__team=team,
                                                                           counter__period_start=start)
            .values("counter_id").annotate(n=Count("pk"), tokens=Sum("tokens"),
                                           stale=Count("pk", filter=Q(created_at__lt=cutoff)))}
    mismatches = []
    counters = QuotaCounter.objects.filter(member__team=team, period_start=start).select_related("member__user")
    seen = set()
    for counter in counters.order_by("member__user__username"):
        name = counter.member.user.username
        seen.add(counter.member_id)
        used = rows.get(counter.member_id, {})
        holds = held.get(counter.pk, {})
        for what, expected, actual in (
            ("requests_used", used.get("requests") or 0, counter.requests_used),
            ("tokens_used", used.get("tokens") or 0, counter.tokens_used),
            ("requests_reserved", holds.get("n") or 0, counter.requests_reserved),
            ("tokens_reserved", holds.get("tokens") or 0, counter.tokens_reserved),
        ):
            if expected != actual:
                mismatches.append(Mismatch(f"{name} {what}", expected, actual))
        if holds.get("stale"):
            mismatches.append(Mismatch(f"{name} reservations older than {reservation_max_age():g} s "
                                       "(their requests died: the sweep gives them back)", 0, holds["stale"]))
    for member_id, used in sorted(rows.items()):
        if member_id not in seen and (used["requests"] or used["tokens"]):
            mismatches.append(Mismatch(f"member {member_id} has usage rows but no counter", "a counter", "none"))
    team_counter = TeamQuotaCounter.objects.filter(team=team, period_start=start).first()
    if team_counter is not None:
        team_used = sum((r["tokens"] or 0) for r in rows.values())
        team_held = QuotaReservation.objects.filter(team_counter=team_counter).aggregate(t=Sum("tokens"))["t"] or 0
        for what, expected, actual in (("tokens_used", team_used, team_counter.tokens_used),
                                       ("tokens_reserved", team_held, team_counter.tokens_reserved)):
            if expected != actual:
                mismatches.append(Mismatch(f"team cap {what}", expected, actual))
    return mismatches


def metrics_scrape(url: str, *, token: str = "", timeout: float = 10.0) -> dict:
    """Scrape an upstream's /metrics: {"at": ISO time, "generation_tokens": the sum over its series}."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    at = timezone.now()
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - an admin's URL
        text = response.read().decode()
    total = sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == GENERATION_TOKENS)
    return {"at": at.isoformat(), "generation_tokens": int(total)}


def metrics_baseline_save(path: Path, scrape: dict) -> None:
    path.write_text(json.dumps(scrape) + "\n")


def metrics_baseline_load(path: Path) -> dict:
    return json.loads(path.read_text())


def upstream_reconcile(*, baseline: dict, now: dict, upstream: str = "", tolerance: int = 0) -> list[Mismatch]:
    """Completion tokens of the usage rows started between two scrapes against vLLM's generated tokens."""
    since, until = datetime.fromisoformat(baseline["at"]), datetime.fromisoformat(now["at"])
    rows = UsageRecord.objects.filter(started_at__gte=since, started_at__lt=until)
    if upstream:
        rows = rows.filter(upstream=upstream)
    recorded = rows.aggregate(t=Sum("completion_tokens"))["t"] or 0
    generated = now["generation_tokens"] - baseline["generation_tokens"]
    if abs(generated - recorded) > tolerance:
        label = f"upstream {upstream} " if upstream else "upstream "
        return [Mismatch(f"{label}completion tokens {since:%Y-%m-%d %H:%M:%S}..{until:%H:%M:%S} "
                         f"(usage rows vs {GENERATION_TOKENS})", recorded, generated)]
    return []
