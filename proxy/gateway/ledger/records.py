"""What the ledger reads and writes: a request's usage, its usage row, its reservation, its settlement.

``Usage`` is what the upstream reported; ``UsageRow`` the rest of the request's one row in
billing_usagerecord; ``Reservation`` what ``reserve`` holds on the counters until the request is
settled; ``Settlement`` one request's settlement as named values, which both back-ends turn into
statements (PostgreSQL also combines many of them into one). ``INSERT_USAGE_SQL`` writes the row,
unique by request id, so a settlement written twice is one row.
"""
from dataclasses import dataclass, field
from datetime import date, datetime

from billing.models import UsageRecord
from tenants import quota

USAGE_TABLE = UsageRecord._meta.db_table
USAGE_COLUMNS = (
    "request_id", "team_id", "member_id", "api_key_id", "period_start", "endpoint", "model", "upstream",
    "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "status", "http_status", "stream",
    "started_at", "ttft_ms", "duration_ms",
)
INSERT_USAGE_SQL = (
    f"INSERT INTO {USAGE_TABLE} ({', '.join(USAGE_COLUMNS)}) VALUES ({', '.join(['%s'] * len(USAGE_COLUMNS))}) "
    "ON CONFLICT (request_id) DO NOTHING"
)


@dataclass(slots=True)
class Usage:
    """What one request used, as the upstream reported it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Cumulative completion tokens per choice, from continuous usage stats in a stream.
    per_choice: dict[int, int] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def take(self, usage: dict) -> None:
        """Adopt a complete usage object (a non-streamed body or a stream's final usage chunk)."""
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            self.cached_tokens = int(details.get("cached_tokens") or 0)

    def take_running(self, choice_index: int, usage: dict) -> None:
        """Adopt a chunk's cumulative usage for one choice (continuous_usage_stats)."""
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.per_choice[choice_index] = int(usage.get("completion_tokens") or 0)
        self.completion_tokens = sum(self.per_choice.values())


@dataclass(slots=True)
class UsageRow:
    request_id: str
    team_id: int
    member_id: int
    api_key_id: int
    period_start: date
    endpoint: str
    model: str
    started_at: datetime
    stream: bool = False
    upstream: str = ""
    status: str = UsageRecord.Status.OK
    http_status: int = 200
    ttft_ms: float | None = None
    duration_ms: float = 0.0

    def values(self, usage: Usage) -> tuple:
        """The row's column values, in USAGE_COLUMNS order."""
        return (
            self.request_id, self.team_id, self.member_id, self.api_key_id, self.period_start, self.endpoint,
            self.model, self.upstream, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
            usage.cached_tokens, self.status, self.http_status, self.stream, self.started_at, self.ttft_ms,
            self.duration_ms,
        )


@dataclass(slots=True)
class Reservation:
    """One request and `tokens` tokens held on a member's counter (and the team's, under a cap)."""

    counter_id: int
    period_start: date
    tokens: int
    team_counter_id: int | None = None
    reservation_id: int | None = None  # its row in tenants_quotareservation (tenants.quota)


@dataclass(frozen=True, slots=True)
class Settlement:
    """One request's settlement: its usage row, and what it moves on the counters of its reservation.

    Without a reservation (a request refused before reserving) only the row is written.
    """

    values: tuple  # the usage row's column values, in USAGE_COLUMNS order
    total_tokens: int  # charged to the counters
    charged_requests: int  # 1 if the request counts against the request quota (tenants.quota)
    reserved_tokens: int = 0  # held on the counters (what is released is what the reservation's row holds)
    counter_id: int | None = None
    team_counter_id: int | None = None
    reservation_id: int | None = None  # deleted by the settlement; gone = released already (the sweep)

    @classmethod
    def of(cls, row: UsageRow, usage: Usage, reservation: Reservation | None = None) -> "Settlement":
        charged = quota.charged_requests(status=row.status, total_tokens=usage.total_tokens)
        if reservation is None:
            return cls(values=row.values(usage), total_tokens=usage.total_tokens, charged_requests=charged)
        return cls(values=row.values(usage), total_tokens=usage.total_tokens, charged_requests=charged,
                   reserved_tokens=reservation.tokens, counter_id=reservation.counter_id,
                   team_counter_id=reservation.team_counter_id, reservation_id=reservation.reservation_id)
