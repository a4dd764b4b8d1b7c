"""Key format, checksum, hashing and display prefix: pure functions, no database."""
import re

import pytest

from tenants.keys import (
    _ALPHABET,
    DISPLAY_PREFIX_LEN,
    KEY_LENGTH,
    KEY_PREFIX,
    api_key_display_prefix,
    api_key_generate,
    api_key_hash,
    api_key_is_plausible,
)


def test_generated_keys_have_the_format_and_a_valid_checksum():
    keys = {api_key_generate() for _ in range(50)}
    assert len(keys) == 50  # random
    for key in keys:
        assert key.startswith(KEY_PREFIX) and len(key) == KEY_LENGTH == 52
        assert re.fullmatch(r"qh_[0-9A-Za-z]{49}", key)
        assert api_key_is_plausible(key)


@pytest.mark.parametrize("seed", range(5))
def test_checksum_detects_any_single_changed_character(seed):
    key = api_key_generate()
    for position in range(len(KEY_PREFIX), len(key)):
        for replacement in (_ALPHABET[(_ALPHABET.index(key[position]) + step) % 62] for step in (1, 31)):
            typo = key[:position] + replacement + key[position + 1 :]
            assert not api_key_is_plausible(typo), (position, typo)


def test_checksum_detects_swapped_neighbours():
    key = api_key_generate()
    swapped = [key[:i] + key[i + 1] + key[i] + key[i + 2 :] for i in range(3, len(key) - 1) if key[i] != key[i + 1]]
    assert swapped and not any(api_key_is_plausible(k) for k in swapped)


def test_wrong_length_or_characters_are_refused():
    key = api_key_generate()
    assert not api_key_is_plausible(key[:-1])
    assert not api_key_is_plausible(key + "A")
    assert not api_key_is_plausible(key[:10] + "-" + key[11:])


@pytest.mark.parametrize(
    "raw, plausible",
    [
        ("sk-abc123", True),
        ("sk-" + "x" * 197, True),  # 200 characters
        ("sk-" + "x" * 198, False),  # 201
        ("sk-abc1", False),  # 7
        ("sk-abc 123", False),
        ("sk-abcé123", False),
        ("sk-abc\t123", False),
        ("", False),
    ],
)
def test_imported_keys_are_bounded_in_length_and_characters(raw, plausible):
    assert api_key_is_plausible(raw) is plausible


def test_hash_is_sha256_hex_and_deterministic():
    assert api_key_hash("sk-abc123") == api_key_hash("sk-abc123")
    assert re.fullmatch(r"sha256\$[0-9a-f]{64}", api_key_hash("sk-abc123"))
    assert api_key_hash("sk-abc123") != api_key_hash("sk-abc124")
    # the known digest, so a change of algorithm (which would lock out every key) cannot pass unnoticed
    assert api_key_hash("sk-abc123") == "sha256$" + __import__("hashlib").sha256(b"sk-abc123").hexdigest()


def test_display_prefix_of_a_qwenhub_key():
    key = api_key_generate()
    assert api_key_display_prefix(key) == key[:DISPLAY_PREFIX_LEN]
    assert len(api_key_display_prefix(key)) * 3 <= len(key)


@pytest.mark.parametrize("length", range(8, 201))
def test_display_prefix_of_an_imported_key_is_never_more_than_a_third(length):
    raw = ("sk-" + "abcdefghij" * 20)[:length]
    prefix = api_key_display_prefix(raw)
    assert raw.startswith(prefix)
    assert len(prefix) * 3 <= len(raw)
    assert len(prefix) <= DISPLAY_PREFIX_LEN
