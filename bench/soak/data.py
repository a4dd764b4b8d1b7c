"""The soak's Django side, in subprocesses with the soak's env: ``python -m bench.soak setup|check '<json>'``."""
from __future__ import annotations

import json
import time
from pathlib import Path

from bench.soak.config import LIMITS, MODEL, QUOTAS, TEAM


def setup(spec: dict) -> dict:
    """A team, one member with a key per user (the first ones with tiny quotas), the simulator's upstream."""
    from proxy.services import upstream_add
    from tenants.services import api_key_issue, member_add, member_update, team_create

    team = team_create(slug=TEAM, name="Soak", timezone_name="UTC", currency="CNY", monthly_cost="3000")
    keys = []
    for i in range(spec["users"]):
        quota = QUOTAS[i] if i < len(QUOTAS) else {}
        member = member_add(team=team, username=f"soak-{i:03d}", **quota)
        if not quota:
            member = member_update(member=member, data=LIMITS)
        keys.append(api_key_issue(member=member, label="soak")[1])
    upstream_add(name="soak", base_url=spec["base_url"], served_name=MODEL, public_name=MODEL,
                 max_concurrency=spec["max_concurrency"])
    return {"keys": keys}


# the usage row's status each client outcome must have
ROW_STATUS = {"ok": {"ok"}, "disconnected": {"client_disconnected", "ok"}, "quota_429": {"rejected"}}


def check(spec: dict) -> dict:
    """After the load: wait until no reservation is held, then match the usage rows with the client's requests."""
    from django.db.models import Count

    from billing.models import UsageRecord
    from tenants.models import QuotaReservation

    t0 = time.monotonic()
    reservations = QuotaReservation.objects.filter(counter__member__team__slug=TEAM)
    while reservations.exists() and time.monotonic() - t0 < spec["wait_s"]:
        time.sleep(0.2)
    waited = time.monotonic() - t0
    left = reservations.count()
    time.sleep(0.5)  # a request's row and its reservation go in one statement; let the last rows land
    sent = json.loads(Path(spec["ids"]).read_text())
    rows = dict(UsageRecord.objects.filter(team__slug=TEAM).values_list("request_id", "status"))
    mismatches, examples = 0, []
    for request_id, outcome in sent:
        if outcome not in ROW_STATUS:
            continue
        status = rows.get(request_id)
        if status not in ROW_STATUS[outcome]:
            mismatches += 1
            if len(examples) < 5:
                examples.append(f"{request_id} ({outcome}): {status or 'no row'}")
    by_status = dict(UsageRecord.objects.filter(team__slug=TEAM).values_list("status").annotate(n=Count("id")))
    return {"reservations_left": left, "waited_s": round(waited, 1), "rows": len(rows), "by_status": by_status,
            "mismatches": mismatches, "examples": examples}


