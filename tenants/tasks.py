"""Tenants' Celery tasks: thin; the schedule is CELERY_BEAT_SCHEDULE in settings."""
from celery import shared_task
from django.db import OperationalError

from tenants.services.reservations import reservations_sweep


@shared_task(autoretry_for=(OperationalError,), retry_backoff=30, max_retries=3)
def reservations_sweep_task() -> int:
    """Give back stale reservations (tenants.services.reservations); return how many requests' worth."""
    return sum(row["requests"] for row in reservations_sweep())
