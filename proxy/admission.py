"""Admission: the exact monthly quota, reserved in the database before forwarding.

One conditional UPDATE reserves 1 request and the request's worst case in tokens
(prompt bound + max_tokens × n). Zero rows updated means "over quota", so
concurrent requests can never push a member past a limit, across any number of
gateway processes. Settlement (proxy.metering) later moves the reservation into
`used` with the real token counts.

Near the limit a request is admitted only if its worst case fits in what is
left: a member with 500 tokens left may still send a request with
max_tokens=300 and a short prompt, but not one that could use 4,096.
"""
from dataclasses import dataclass
from datetime import date

from django.db import connection

from billing.models import QuotaCounter
from billing.periods import period_reset_at, period_start_for
from proxy.db import run_db
from proxy.errors import ApiError
from proxy.keys import KeyInfo

QUOTA_REQUESTS_EXHAUSTED = (
    "You have used all {limit} requests of your monthly quota. It resets at {reset} ({tz}). "
    "Ask your team admin for a top-up."
)
QUOTA_TOKENS_EXHAUSTED = (
    "This request could use up to {need} tokens but only {left} of your monthly quota of {limit} tokens remain. "
    "Lower max_tokens or shorten the prompt; the quota resets at {reset} ({tz})."
)

_COUNTER = QuotaCounter._meta.db_table
_RESERVE_SQL = f"""
UPDATE {_COUNTER}
   SET requests_reserved = requests_reserved + 1, tokens_reserved = tokens_reserved + %s
 WHERE member_id = %s AND period_start = %s
   AND (request_limit IS NULL OR requests_used + requests_reserved + 1 <= request_limit)
   AND (token_limit IS NULL OR tokens_used + tokens_reserved + %s <= token_limit)
RETURNING id"""
_OPEN_SQL = f"""
INSERT INTO {_COUNTER} (member_id, period_start, request_limit, token_limit,
                        requests_used, requests_reserved, tokens_used, tokens_reserved)
VALUES (%s, %s, %s, %s, 0, 0, 0, 0)
ON CONFLICT (member_id, period_start) DO NOTHING"""


@dataclass(slots=True)
class Reservation:
    counter_id: int
    period_start: date
    tokens: int


class QuotaExceeded(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(429, message, "insufficient_quota", code="insufficient_quota",
                         headers=[(b"x-should-retry", b"false")])


def _reserve(member_id: int, start: date, tokens: int, request_quota, token_quota) -> int | QuotaCounter:
    """Return the reserved counter's id, or the counter that has no room left."""
    with connection.cursor() as cursor:
        cursor.execute(_RESERVE_SQL, [tokens, member_id, start, tokens])
        row = cursor.fetchone()
        if row:
            return row[0]
        # No row: either this is the member's first request of the month, or over quota.
        # (A concurrent first request may have opened it already: retry either way.)
        cursor.execute(_OPEN_SQL, [member_id, start, request_quota, token_quota])
        cursor.execute(_RESERVE_SQL, [tokens, member_id, start, tokens])
        row = cursor.fetchone()
        if row:
            return row[0]
    return QuotaCounter.objects.get(member_id=member_id, period_start=start)


async def reserve(key: KeyInfo, tokens: int) -> Reservation:
    """Reserve one request and `tokens` tokens for key's member in the current period, or raise QuotaExceeded."""
    start = period_start_for(key.team_timezone)
    result = await run_db(_reserve, key.member_id, start, tokens, key.request_quota, key.token_quota)
    if isinstance(result, int):
        return Reservation(counter_id=result, period_start=start, tokens=tokens)
    counter, tz = result, key.team_timezone
    reset = period_reset_at(tz, start).strftime("%Y-%m-%d %H:%M")
    if counter.request_limit is not None and counter.requests_used + counter.requests_reserved + 1 > counter.request_limit:
        raise QuotaExceeded(QUOTA_REQUESTS_EXHAUSTED.format(limit=counter.request_limit, reset=reset, tz=tz))
    left = max(0, (counter.token_limit or 0) - counter.tokens_used - counter.tokens_reserved)
    raise QuotaExceeded(QUOTA_TOKENS_EXHAUSTED.format(need=tokens, left=left, limit=counter.token_limit,
                                                      reset=reset, tz=tz))
