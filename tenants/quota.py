"""The quota rule, in one place: plain code and SQL text, no ORM queries.

A member's month is a QuotaCounter row (tenants.models): limits copied from the member
when the row is opened, then moved only inside the database. Both the ORM services
(tenants.services.quotas) and the gateway's ledger (proxy.gateway.ledger) use what is
here, so the rule cannot drift between the two:

- the **worst case** a request may use, reserved before it is forwarded
  (`reservation_tokens`): a request is admitted only if that fits in what is left, so
  used tokens never exceed the quota;
- what a finished request is **charged** (`charged_requests`, and its real tokens);
- the **refusal texts** (`refusal_message`), which say what is left and when it resets;
- the **statements**: the one that opens a month's counter (it reads the member's
  quotas from the member row at that instant, so a quota changed seconds before the
  month's first request is the one the month gets, whatever a cache still holds),
  and the conditional UPDATEs that reserve, give back and settle;
- the **reservation rows** (tenants.models.QuotaReservation): each reservation is also a
  row, written by the reservation's statement and deleted by the settlement's, so one
  whose request never settled (its process died after PostgreSQL committed it) can be
  found and given back by the sweep. A settlement releases what its row held, and only
  if the row is still there: one arriving after the sweep (or the month's close) gave its
  reservation back still writes its usage row and charges its usage, and no reserved
  column goes below zero (nor requests_used above its limit: the CHECK would refuse it).

Statements use `%s` placeholders (Django's cursor; the gateway numbers them for asyncpg).
"""
from datetime import date

# A prompt token is at least one byte of the request body, whose JSON syntax
# also outweighs the chat template's tokens; this covers what is left over.
PROMPT_BOUND_SLACK = 64

# Usage-row statuses whose request counts against the request quota even without tokens
# (the values of billing.models.UsageRecord.Status.OK and .CLIENT_DISCONNECTED).
ANSWERED_STATUSES = frozenset({"ok", "client_disconnected"})

QUOTA_REQUESTS_EXHAUSTED = (
    "You have used all {limit} requests of your monthly quota. It resets at {reset} ({tz}). "
    "Ask your team admin for a top-up."
)
TEAM_CAP_EXHAUSTED = (
    "This request could use up to {need} tokens but only {left} of your team's monthly cap of {limit} tokens "
    "remain. Lower max_tokens or ask your team admin; the cap resets at {reset} ({tz})."
)
QUOTA_TOKENS_EXHAUSTED = (
    "This request could use up to {need} tokens but only {left} of your monthly quota of {limit} tokens remain. "
    "Lower max_tokens or shorten the prompt; the quota resets at {reset} ({tz})."
)


def reservation_tokens(*, body_bytes: int, completion_bound: int, max_model_len: int) -> int:
    """Return the most tokens a request can use: its prompt's bound plus its completion bound."""
    return min(body_bytes + PROMPT_BOUND_SLACK, max_model_len) + completion_bound


def charged_requests(*, status: str, total_tokens: int) -> int:
    """Return 1 if a finished request counts against the request quota: it was answered, or used tokens."""
    return 1 if status in ANSWERED_STATUSES or total_tokens else 0


def refusal_message(*, team_cap: bool, need: int, request_limit: int | None, requests_used: int,
                    requests_reserved: int, token_limit: int | None, tokens_used: int, tokens_reserved: int,
                    reset: str, tz: str) -> str:
    """Say why a request of `need` tokens does not fit a counter (the member's, or the team's cap)."""
    left = max(0, (token_limit or 0) - tokens_used - tokens_reserved)
    if team_cap:
        return TEAM_CAP_EXHAUSTED.format(need=need, left=left, limit=token_limit, reset=reset, tz=tz)
    if request_limit is not None and requests_used + requests_reserved + 1 > request_limit:
        return QUOTA_REQUESTS_EXHAUSTED.format(limit=request_limit, reset=reset, tz=tz)
    return QUOTA_TOKENS_EXHAUSTED.format(need=need, left=left, limit=token_limit, reset=reset, tz=tz)


COUNTER = "billing_quotacounter"  # tenants.models.QuotaCounter._meta.db_table (checked by a test)
TEAM_COUNTER = "billing_teamquotacounter"  # tenants.models.TeamQuotaCounter._meta.db_table
MEMBER = "tenants_member"
TEAM = "tenants_team"
RESERVATION = "tenants_quotareservation"  # tenants.models.QuotaReservation._meta.db_table

# How long a reservation may be held by a request still running: the longest request
# (QWENHUB_UPSTREAM_TIMEOUT) plus QWENHUB_RESERVATION_MARGIN (settings); older ones are swept.

# The one statement that opens a member's month: the limits are the member's quotas now.
OPEN_SQL = f"""
INSERT INTO {COUNTER} (member_id, period_start, request_limit, token_limit,
                       requests_used, requests_reserved, tokens_used, tokens_reserved)
SELECT id, %s, request_quota, token_quota, 0, 0, 0, 0 FROM {MEMBER} WHERE id = %s
ON CONFLICT (member_id, period_start) DO NOTHING"""

# The same for every active member of a team at once (the monthly close opens the new month).
OPEN_TEAM_SQL = f"""
INSERT INTO {COUNTER} (member_id, period_start, request_limit, token_limit,
                       requests_used, requests_reserved, tokens_used, tokens_reserved)
SELECT id, %s, request_quota, token_quota, 0, 0, 0, 0 FROM {MEMBER} WHERE team_id = %s AND is_active
ON CONFLICT (member_id, period_start) DO NOTHING"""

# Reserve 1 request and %s tokens if the worst case fits; no row returned = no room (or no row yet).
RESERVE_SQL = f"""
UPDATE {COUNTER}
   SET requests_reserved = requests_reserved + 1, tokens_reserved = tokens_reserved + %s
 WHERE member_id = %s AND period_start = %s
   AND (request_limit IS NULL OR requests_used + requests_reserved + 1 <= request_limit)
   AND (token_limit IS NULL OR tokens_used + tokens_reserved + %s <= token_limit)
RETURNING id"""

# The same for n requests of one member at once (the gateway combines a burst).
RESERVE_MANY_SQL = f"""
UPDATE {COUNTER}
   SET requests_reserved = requests_reserved + %s, tokens_reserved = tokens_reserved + %s
 WHERE member_id = %s AND period_start = %s
   AND (request_limit IS NULL OR requests_used + requests_reserved + %s <= request_limit)
   AND (token_limit IS NULL OR tokens_used + tokens_reserved + %s <= token_limit)
RETURNING id"""

# Gives back a reservation that will never be settled (args: reservation id, counter id).
# PostgreSQL (a data-modifying CTE); SQLite runs DELETE_RESERVATION_SQL, then settle_sql's UPDATE.
RELEASE_SQL = f"""
WITH rel AS (DELETE FROM {RESERVATION} WHERE id = %s RETURNING tokens)
UPDATE {COUNTER} SET requests_reserved = GREATEST(requests_reserved - 1, 0),
                     tokens_reserved = GREATEST(tokens_reserved - rel.tokens, 0)
  FROM rel WHERE {COUNTER}.id = %s"""

TEAM_OPEN_SQL = f"""
INSERT INTO {TEAM_COUNTER} (team_id, period_start, token_limit, tokens_used, tokens_reserved)
SELECT id, %s, token_cap, 0, 0 FROM {TEAM} WHERE id = %s
ON CONFLICT (team_id, period_start) DO NOTHING"""

TEAM_RESERVE_SQL = f"""
UPDATE {TEAM_COUNTER} SET tokens_reserved = tokens_reserved + %s
 WHERE team_id = %s AND period_start = %s
   AND (token_limit IS NULL OR tokens_used + tokens_reserved + %s <= token_limit)
RETURNING id"""


def open_args(*, member_id: int, start: date) -> list:
    return [start, member_id]


def team_open_args(*, team_id: int, start: date) -> list:
    return [start, team_id]


# --- reservation rows -----------------------------------------------------------------------
# On PostgreSQL a reservation's row is written by the reservation's own UPDATE (one statement,
# a data-modifying CTE); SQLite writes it with RECORD_RESERVATION_SQL in the same transaction.

# Args: RESERVE_SQL's, then the tokens again. Returns (counter id, reservation id).
RESERVE_RECORDED_SQL = f"""
WITH c AS ({RESERVE_SQL})
INSERT INTO {RESERVATION} (counter_id, team_counter_id, tokens, created_at)
SELECT id, NULL, %s, now() FROM c RETURNING counter_id, id"""

# Args: RESERVE_MANY_SQL's, then the requests' tokens (an array).
# Returns (counter id, reservation id, tokens) per request.
RESERVE_MANY_RECORDED_SQL = f"""
WITH c AS ({RESERVE_MANY_SQL})
INSERT INTO {RESERVATION} (counter_id, team_counter_id, tokens, created_at)
SELECT c.id, NULL, t.tokens, now() FROM c, unnest(%s::bigint[]) AS t(tokens) RETURNING counter_id, id, tokens"""

# Under a team cap (after the member's RESERVE_SQL, in its transaction). Args: TEAM_RESERVE_SQL's,
# then the member's counter id and the tokens. Returns (team counter id, reservation id).
TEAM_RESERVE_RECORDED_SQL = f"""
WITH t AS ({TEAM_RESERVE_SQL})
INSERT INTO {RESERVATION} (counter_id, team_counter_id, tokens, created_at)
SELECT %s, id, %s, now() FROM t RETURNING team_counter_id, id"""

# What the sweep gave back, ever (the gateway's /metrics: qwenhub_reservations_swept_total).
SWEPT_SQL = (f"SELECT COALESCE(SUM(reservations_swept), 0), COALESCE(SUM(tokens_swept), 0) FROM {COUNTER} "
             "WHERE reservations_swept > 0")

# SQLite: args counter id, team counter id, tokens, created at.
RECORD_RESERVATION_SQL = f"""
INSERT INTO {RESERVATION} (counter_id, team_counter_id, tokens, created_at) VALUES (%s, %s, %s, %s)"""

# SQLite: the settlement's (or give-back's) release: returns the tokens the row held, if it was still there.
DELETE_RESERVATION_SQL = f"DELETE FROM {RESERVATION} WHERE id = %s RETURNING tokens"


def settle_sql(*, released: str, released_tokens: str, charged: str, used: str, greatest: str = "GREATEST",
               least: str = "LEAST") -> str:
    """The settlement's UPDATE of a member's counter (without its WHERE), as SQL expressions.

    `released`/`released_tokens`: what the settlement's reservation rows held (0 if the sweep
    or the close gave them back first); `charged`/`used`: the requests and tokens charged.
    Reserved columns never go below zero; requests_used never above request_limit (the
    CHECK): a request whose reservation was swept and whose room was taken meanwhile is in
    its usage row but not in the counter (reconcile shows it). SQLite spells GREATEST and
    LEAST as max and min.
    """
    return f"""UPDATE {COUNTER}
   SET requests_reserved = {greatest}(requests_reserved - {released}, 0),
       tokens_reserved = {greatest}(tokens_reserved - {released_tokens}, 0),
       requests_used = {least}(requests_used + {charged}, COALESCE(request_limit, requests_used + {charged})),
       tokens_used = tokens_used + {used}"""


def team_settle_sql(*, released_tokens: str, used: str, greatest: str = "GREATEST") -> str:
    """The settlement's UPDATE of a team's cap counter (without its WHERE)."""
    return f"""UPDATE {TEAM_COUNTER}
   SET tokens_reserved = {greatest}(tokens_reserved - {released_tokens}, 0), tokens_used = tokens_used + {used}"""
