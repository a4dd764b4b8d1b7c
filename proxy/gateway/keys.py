"""API key authentication for the gateway, off the database in the common case.

Each gateway process keeps a small dict {key hash → KeyInfo} for
QWENHUB_KEY_CACHE_SECONDS (default 3 s), so a revoked or expired key, or a
deactivated member, stops working on every process within that time without
any cross-process messaging. A miss costs one SELECT with joins.
"""
import asyncio
import time
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.utils import timezone

from proxy.gateway.db import run_db
from tenants.keys import api_key_hash, api_key_is_plausible
from tenants.models import ApiKey

_MAX_ENTRIES = 50_000
_LAST_USED_EVERY = 60.0  # seconds between last_used_at writes per key and process


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
_last_used_written: dict[int, float] = {}


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
    now = time.monotonic()
    if now - _last_used_written.get(key.pk, 0.0) > _LAST_USED_EVERY:
        _last_used_written[key.pk] = now
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=timezone.now())
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
    if info is None or not info.is_valid(timezone.now()):
        return None
    return info


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
