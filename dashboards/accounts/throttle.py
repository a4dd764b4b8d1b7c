"""Failed sign-ins counted per account and per client address, in Django's cache.

The cache is Redis in production (shared by every process) and local memory when embedded
(per process: the usual fallback). Each counter is a fixed window: the first failure opens
it for QWENHUB_LOGIN_FAILURE_WINDOW seconds; once QWENHUB_LOGIN_FAILURES_PER_ACCOUNT (or
..._PER_ADDRESS) failures are in it, further attempts are refused before the password is
checked, until the window ends. A success clears the account's counter, not the address's
(an attacker's own account must not reset their address's count).

The client address is REMOTE_ADDR. Behind a reverse proxy the proxy must set it (uvicorn
does so from X-Forwarded-For for the addresses in its --forwarded-allow-ips, 127.0.0.1 by
default); X-Forwarded-For itself is trusted only with QWENHUB_LOGIN_TRUST_X_FORWARDED_FOR,
and then only its last entry (the one the nearest proxy added).
"""
import hashlib
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

PREFIX = "login-failures"


@dataclass(frozen=True)
class Limit:
    key: str
    limit: int


def client_address(request) -> str:
    if getattr(settings, "QWENHUB_LOGIN_TRUST_X_FORWARDED_FOR", False):
        forwarded = [a.strip() for a in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",") if a.strip()]
        if forwarded:
            return forwarded[-1]
    return request.META.get("REMOTE_ADDR", "") or "unknown"


def _digest(value: str) -> str:
    # Cache keys hold no usernames (nor arbitrary bytes from the form).
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def account_key(username: str) -> str:
    return f"{PREFIX}:account:{_digest(username.strip().casefold())}"


def address_key(address: str) -> str:
    return f"{PREFIX}:address:{_digest(address)}"


def _limits(request, username: str) -> list[Limit]:
    limits = [Limit(address_key(client_address(request)), settings.QWENHUB_LOGIN_FAILURES_PER_ADDRESS)]
    if username.strip():
        limits.append(Limit(account_key(username), settings.QWENHUB_LOGIN_FAILURES_PER_ACCOUNT))
    return limits


def login_limited(request, username: str) -> bool:
    """Whether this attempt is refused (checked before the password is verified)."""
    limits = _limits(request, username)
    counts = cache.get_many([limit.key for limit in limits])
    return any(counts.get(limit.key, 0) >= limit.limit for limit in limits)


def _incr(key: str) -> int:
    window = settings.QWENHUB_LOGIN_FAILURE_WINDOW
    cache.add(key, 0, timeout=window)  # opens the window; a running one keeps its expiry
    try:
        return cache.incr(key)
    except ValueError:  # expired between add and incr
        cache.set(key, 1, timeout=window)
        return 1


def login_failed(request, username: str) -> None:
    for limit in _limits(request, username):
        _incr(limit.key)


def login_succeeded(username: str) -> None:
    cache.delete(account_key(username))
