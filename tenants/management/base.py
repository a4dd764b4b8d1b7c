"""What QwenHub's management commands share: argument types and error reporting.

Commands are thin interfaces: parse, call a service, print. A service says no with
ValidationError (or ValueError); the command turns that into CommandError, which
Django prints to stderr and exits non-zero. Services run in one transaction, so a
refusal writes nothing.
"""
import argparse
from contextlib import contextmanager

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

# AuditEvent.reason's length.
REASON_MAX = 500


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: use 0 or more (leave the option out for unlimited)")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def error_text(exc: Exception) -> str:
    """Return a ValidationError (or any exception) as one readable line."""
    if isinstance(exc, ValidationError):
        if hasattr(exc, "error_dict"):
            return "; ".join(
                f"{field}: {' '.join(messages)}" if field != "__all__" else " ".join(messages)
                for field, messages in exc.message_dict.items()
            )
        return " ".join(exc.messages)
    return str(exc)


@contextmanager
def service_errors():
    """Turn a service's refusal into a CommandError (stderr, exit status 1)."""
    try:
        yield
    except (ValidationError, ValueError) as exc:
        raise CommandError(error_text(exc)) from exc


def limit_text(value: int | None) -> str:
    return "unlimited" if value is None else str(value)
