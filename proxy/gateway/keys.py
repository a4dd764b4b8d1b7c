"""API key authentication for the gateway, off the database in the common case.

Each gateway process keeps a small dict {key hash → KeyInfo} for
QWENHUB_KEY_CACHE_SECONDS (default 3 s), so a revoked or expired key, or a
deactivated member, stops working on every process within that time without
any cross-process messaging. A miss costs one SELECT with joins.

Authentication does no writes: it notes in a dict that key K was used at time T, and a
background task started by the first authentication writes the noted times every
QWENHUB_LAST_USED_FLUSH_SECONDS (default 30 s) in one UPDATE, which never moves
last_used_at backwards (several processes flush independently). The gateway's shutdown
calls stop_last_used_flusher(), which writes what is still noted.
"""
import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db.models import Case, DateTimeField, Q, Value, When
from django.utils import timezone

from proxy.gateway.db import run_db
from tenants.keys import api_key_hash, api_key_is_plausible
from tenants.models import ApiKey

log = logging.getLogger("qwenhub.gateway")

_MAX_ENTRIES = 50_000
_LAST_USED_BATCH = 1_000  # keys per UPDATE statement (a flush of more keys takes several)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: int
    member_id: int
    team_id: int
    username: str
    team_timezone: str
    team_token_cap: int | None
    usable: bool  # not revoked, member and user active
    expires_at: datetime | None
    request_quota: int | None
    token_quota: int | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent_requests: int | None
    weight: int
    allowed_model_ids: frozenset[int]  # empty = every model

    def is_valid(self, now: datetime) -> bool:
        return self.usable and (self.expires_at is None or self.expires_at > now)

    def may_use(self, model_id: int) -> bool:
        return not self.allowed_model_ids or model_id in self.allowed_model_ids


_cache: dict[str, tuple[float, KeyInfo | None]] = {}
_loading: dict[str, asyncio.Task] = {}
# key id → when this process last authenticated it, not yet written
_last_used_pending: dict[int, datetime] = {}
_flusher: asyncio.Task | None = None


def _load(key_hash: str) -> KeyInfo | None:
    key = (
        ApiKey.objects.select_related("member__team", "member__user")
        .filter(key_hash=key_hash)
        .only(
            "id", "revoked_at", "expires_at", "member__id", "member__is_active", "member__request_quota",
            "member__token_quota", "member__requests_per_minute", "member__tokens_per_minute",
            "member__max_concurrent_requests", "member__weight", "member__team__id", "member__team__timezone",
            "member__team__token_cap",
            "member__user__is_active", "member__user__username",
        )
        .first()
    )
    if key is None:
        return None
    member = key.member
    allowed = frozenset(member.allowed_models.values_list("id", flat=True))
    return KeyInfo(
        key_id=key.pk, member_id=member.pk, team_id=member.team_id, username=member.user.username,
        team_timezone=member.team.timezone, team_token_cap=member.team.token_cap,
        usable=key.revoked_at is None and member.is_active and member.user.is_active,
        expires_at=key.expires_at, request_quota=member.request_quota, token_quota=member.token_quota,
        requests_per_minute=member.requests_per_minute, tokens_per_minute=member.tokens_per_minute,
        max_concurrent_requests=member.max_concurrent_requests, weight=member.weight,
        allowed_model_ids=allowed,
    )


async def _load_and_cache(key_hash: str) -> KeyInfo | None:
    try:
        info = await run_db(_load, key_hash)
        if len(_cache) >= _MAX_ENTRIES:
            _cache.clear()
        _cache[key_hash] = (time.monotonic() + settings.QWENHUB_KEY_CACHE_SECONDS, info)
        return info
    finally:
        del _loading[key_hash]


async def authenticate(raw_key: str | None) -> KeyInfo | None:
    """Return the KeyInfo for a presented key, or None for any kind of invalid key."""
    if not raw_key or not api_key_is_plausible(raw_key):
        return None
    key_hash = api_key_hash(raw_key)
    now = time.monotonic()
    hit = _cache.get(key_hash)
    if hit is not None and hit[0] > now:
        info = hit[1]
    else:
        # One lookup per key at a time, in a task of its own: a request that goes away
        # does not cancel it for the others waiting on it.
        task = _loading.get(key_hash)
        if task is None:
            task = _loading[key_hash] = asyncio.ensure_future(_load_and_cache(key_hash))
        info = await asyncio.shield(task)
    used_at = timezone.now()
    if info is None or not info.is_valid(used_at):
        return None
    _last_used_pending[info.key_id] = used_at
    if _flusher is None or _flusher.done() or _flusher.get_loop() is not asyncio.get_running_loop():
        _start_last_used_flusher()
    return info


# --- guessing keys ----------------------------------------------------------------------------
# Each process counts the invalid keys per client address in a fixed window; past the limit the
# address gets 429s without a lookup (a miss costs a SELECT) until the window ends, except for
# keys this process has seen valid before: a lab behind one NAT address keeps working while a
# script with a wrong key hammers. Per process: with N workers an address may try up to N × the
# limit per window.
_bad_keys: dict[str, tuple[float, int]] = {}  # address → (window end, failures)
_BAD_KEY_WINDOW = 60.0


def note_bad_key(address: str) -> None:
    now = time.monotonic()
    end, count = _bad_keys.get(address, (0.0, 0))
    if end <= now:
        if len(_bad_keys) >= _MAX_ENTRIES:
            _bad_keys.clear()
        end, count = now + _BAD_KEY_WINDOW, 0
    _bad_keys[address] = (end, count + 1)


def known_key(raw_key: str | None) -> bool:
    """True for a key this process found valid at some point (its cache entry may have expired)."""
    if not raw_key or not api_key_is_plausible(raw_key):
        return False
    entry = _cache.get(api_key_hash(raw_key))
    return entry is not None and entry[1] is not None


def bad_key_wait_ms(address: str) -> int | None:
    """Milliseconds until the address may try again, or None when it is under the limit."""
    entry = _bad_keys.get(address)
    if entry is None or entry[1] < settings.QWENHUB_BAD_KEYS_PER_MINUTE:
        return None
    wait = entry[0] - time.monotonic()
    return int(wait * 1000) + 1 if wait > 0 else None


# --- last_used_at, written off the request path ------------------------------------------------

def _write_last_used(batch: dict[int, datetime]) -> int:
    """Write the batch's times with one UPDATE per _LAST_USED_BATCH keys; never move a time backwards."""
    written = 0
    items = sorted(batch.items())  # a fixed order, so concurrent flushes lock rows alike
    for i in range(0, len(items), _LAST_USED_BATCH):
        chunk = items[i:i + _LAST_USED_BATCH]
        used_at = Case(*(When(pk=pk, then=Value(t)) for pk, t in chunk), output_field=DateTimeField())
        written += (ApiKey.objects.filter(pk__in=[pk for pk, _ in chunk])
                    .filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=used_at))
                    .update(last_used_at=used_at))
    return written


async def flush_last_used() -> int:
    """Write the noted last-use times now; return how many keys' times were written."""
    if not _last_used_pending:
        return 0
    batch = _last_used_pending.copy()
    _last_used_pending.clear()
    try:
        return await run_db(_write_last_used, batch)
    except BaseException:
        for pk, used_at in batch.items():
            _last_used_pending.setdefault(pk, used_at)  # a time noted since is later: keep it
        raise


async def _flush_last_used_forever() -> None:
    while True:
        await asyncio.sleep(settings.QWENHUB_LAST_USED_FLUSH_SECONDS)
        try:
            await flush_last_used()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("could not write last_used_at; retrying at the next flush", exc_info=True)


def _start_last_used_flusher() -> None:
    global _flusher
    _flusher = asyncio.get_running_loop().create_task(_flush_last_used_forever(), name="qwenhub-last-used")


async def stop_last_used_flusher() -> None:
    """Stop the background flush and write what is still noted (the gateway's shutdown calls this)."""
    global _flusher
    task, _flusher = _flusher, None
    if task is not None and not task.done():
        task.cancel()
        if task.get_loop() is asyncio.get_running_loop():
            with contextlib.suppress(asyncio.CancelledError):
                await task
    await flush_last_used()


def forget_all() -> None:
    """Drop every cached key (tests, and after bulk changes in this process)."""
    _cache.clear()


def extract_key(headers: dict[bytes, bytes]) -> str | None:
    """Read the key from Authorization: Bearer, api-key or x-api-key."""
    auth = headers.get(b"authorization")
    if auth:
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        return value.strip().decode("latin-1") or None
    value = headers.get(b"api-key") or headers.get(b"x-api-key")
    return value.strip().decode("latin-1") if value else None
