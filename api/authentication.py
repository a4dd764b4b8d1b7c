"""`Authorization: Bearer <key>`: a member's QwenHub API key (the same key as /v1) authenticates as that member.

The api app does not import the gateway: it hashes the presented key with
tenants.keys.api_key_hash and looks it up through tenants.selectors, caching the lookup
in Django's cache for QWENHUB_KEY_CACHE_SECONDS (the gateway's own revocation delay), so a
revoked or expired key, or a suspended member, stops working here within that time too.
The decision (revoked, expired, inactive) is made on every request from the cached row;
an unknown key is cached as well, so guessing costs no query either.
"""
from django.conf import settings
from django.core.cache import cache
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions

from tenants.keys import api_key_hash, api_key_is_plausible
from tenants.selectors import api_key_for_authentication

CACHE_PREFIX = "api:key:"
_UNKNOWN = "unknown"  # cached for a key that does not exist (None would read as a miss)

KEY_INVALID = _("Invalid API key.")
KEY_REVOKED = _("This API key has been revoked.")
KEY_EXPIRED = _("This API key has expired.")
MEMBER_INACTIVE = _("This key's membership is suspended.")
HEADER_INVALID = _("Malformed Authorization header: send `Authorization: Bearer <key>`.")


def key_lookup(raw: str):
    """The ApiKey (with member, user and team) for a presented key, from the cache or one query; None if unknown."""
    key_hash = api_key_hash(raw)
    cache_key = CACHE_PREFIX + key_hash.partition("$")[2]
    hit = cache.get(cache_key)
    if hit is not None:
        return None if hit == _UNKNOWN else hit
    key = api_key_for_authentication(key_hash=key_hash)
    cache.set(cache_key, key if key is not None else _UNKNOWN, settings.QWENHUB_KEY_CACHE_SECONDS)
    return key


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None  # not ours: the session may authenticate
        if len(header) != 2:
            raise exceptions.AuthenticationFailed(HEADER_INVALID)
        try:
            raw = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed(KEY_INVALID) from None
        if not api_key_is_plausible(raw):
            raise exceptions.AuthenticationFailed(KEY_INVALID)
        key = key_lookup(raw)
        if key is None:
            raise exceptions.AuthenticationFailed(KEY_INVALID)
        if key.revoked_at is not None:
            raise exceptions.AuthenticationFailed(KEY_REVOKED)
        if key.expires_at is not None and key.expires_at <= timezone.now():
            raise exceptions.AuthenticationFailed(KEY_EXPIRED)
        member = key.member
        if not member.is_active or not member.user.is_active:
            raise exceptions.AuthenticationFailed(MEMBER_INACTIVE)
        return member.user, key

    def authenticate_header(self, request):
        return f'{self.keyword} realm="api"'


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = ApiKeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer",
                "description": "A member's QwenHub API key (the same key as /v1): acts as that member."}
