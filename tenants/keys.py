"""API key format, hashing and checks: pure functions, no database.

A QwenHub key looks like ``qh_<43 base62 chars><6 base62 chars>``: 256 bits of
randomness and a CRC32 checksum of them, so secret scanners (and the gateway,
without a database round trip) can tell a real key from a typo. Only
``sha256$<hex>`` of the whole key is stored, with a short display prefix.
Keys imported from other systems keep their own format.
"""
import hashlib
import secrets
import zlib

KEY_PREFIX = "qh_"
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_LEN = 43  # 62**43 > 2**256
_CHECK_LEN = 6  # 62**6 > 2**32
KEY_LENGTH = len(KEY_PREFIX) + _RANDOM_LEN + _CHECK_LEN
DISPLAY_PREFIX_LEN = 10


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        chars.append(_ALPHABET[rest])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_LEN)


def api_key_generate() -> str:
    """Return a new random key in QwenHub's format."""
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_LEN))
    return f"{KEY_PREFIX}{body}{_checksum(body)}"


def api_key_hash(raw: str) -> str:
    """Return the stored form of a key (keys are high-entropy, so SHA-256 suffices)."""
    return "sha256$" + hashlib.sha256(raw.encode()).hexdigest()


def api_key_is_plausible(raw: str) -> bool:
    """Tell whether a presented key could exist, without the database.

    QwenHub-format keys must carry a valid checksum; imported keys are only
    bounded in length and character set.
    """
    if raw.startswith(KEY_PREFIX):
        if len(raw) != KEY_LENGTH:
            return False
        body, check = raw[len(KEY_PREFIX) : -_CHECK_LEN], raw[-_CHECK_LEN:]
        return all(c in _ALPHABET for c in body) and _checksum(body) == check
    return 8 <= len(raw) <= 200 and raw.isascii() and raw.isprintable() and " " not in raw


def api_key_display_prefix(raw: str) -> str:
    """Return the part of a key shown in lists: never more than a third of it."""
    if raw.startswith(KEY_PREFIX) and len(raw) == KEY_LENGTH:
        return raw[:DISPLAY_PREFIX_LEN]
    return raw[: min(DISPLAY_PREFIX_LEN, len(raw) // 3)]
