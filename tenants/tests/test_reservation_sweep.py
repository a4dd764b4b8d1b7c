"""The reservation sweep as the scheduler runs it: its beat entry, its task, its bound, beside live settlements."""
import logging
import threading
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from qwenhub.celery import app
from tenants.models import AuditEvent, QuotaCounter, QuotaReservation
from tenants.services.reservations import reservation_max_age, reservations_sweep
from billing.tasks import reservations_sweep_task
from tenants.tests.factories import QuotaCounterFactory


def _held(counter: QuotaCounter, tokens: int, age_s: float) -> QuotaReservation:
    """A reservation made `age_s` seconds ago, held on the counter as the gateway holds it."""
    QuotaCounter.objects.filter(pk=counter.pk).update(requests_reserved=counter.requests_reserved + 1,
                                                      tokens_reserved=counter.tokens_reserved + tokens)
    counter.refresh_from_db()
    return QuotaReservation.objects.create(counter=counter, tokens=tokens,
                                           created_at=timezone.now() - timedelta(seconds=age_s))


def test_the_schedule_runs_the_sweep_every_five_minutes():
    entry = settings.CELERY_BEAT_SCHEDULE["billing-reservations-sweep"]
    assert entry["task"] == "billing.tasks.reservations_sweep_task" and entry["task"] in app.tasks
    assert entry["schedule"].minute == set(range(0, 60, 5))


def test_the_bound_is_the_queue_wait_plus_the_upstream_timeout_plus_the_margin(settings):
    settings.QWENHUB_QUEUE_TIMEOUT, settings.QWENHUB_UPSTREAM_TIMEOUT = 60.0, 600.0
    settings.QWENHUB_RESERVATION_MARGIN = 240.0
    assert reservation_max_age() == 900.0


@pytest.mark.django_db
def test_the_task_gives_back_what_is_older_than_the_bound_and_says_so(settings, caplog):
    settings.QWENHUB_QUEUE_TIMEOUT, settings.QWENHUB_UPSTREAM_TIMEOUT = 10.0, 20.0
    settings.QWENHUB_RESERVATION_MARGIN = 30.0  # 60 s in all
    counter = QuotaCounterFactory()
    _held(counter, 500, age_s=61)
    young = _held(counter, 70, age_s=59)
    with caplog.at_level(logging.WARNING, logger="qwenhub.quota"):
        assert reservations_sweep_task.apply().get() == 1
    counter.refresh_from_db()
    assert (counter.requests_reserved, counter.tokens_reserved) == (1, 70)
    assert (counter.reservations_swept, counter.tokens_swept) == (1, 500)
    assert list(QuotaReservation.objects.values_list("pk", flat=True)) == [young.pk]
    assert f"swept stale reservations member_id={counter.member_id}" in caplog.text and "tokens=500" in caplog.text
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.RESERVATIONS_RELEASED)
    assert event.actor is None and "never settled" in event.reason and event.data["requests"] == 1
    assert reservations_sweep_task.apply().get() == 0  # run twice, given back once


@pytest.mark.django_db
def test_the_sweep_never_drives_a_counter_below_zero():
    """The month's close already gave the reservation back by the counter's columns; its row is still there."""
    counter = QuotaCounterFactory()
    _held(counter, 500, age_s=7200)
    QuotaCounter.objects.filter(pk=counter.pk).update(requests_reserved=0, tokens_reserved=0)
    assert reservations_sweep() == []  # nothing left to give back, nothing reported
    counter.refresh_from_db()
    assert (counter.requests_reserved, counter.tokens_reserved) == (0, 0)
    assert (counter.reservations_swept, counter.tokens_swept) == (0, 0)
    assert not QuotaReservation.objects.exists() and not AuditEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_row_being_settled_right_now_is_skipped_not_waited_for():
    counter = QuotaCounterFactory()
    busy = _held(counter, 100, age_s=7200)
    locked, done = threading.Event(), threading.Event()

    def settling():  # a settlement holding the row's lock (as the gateway's DELETE does)
        try:
            with transaction.atomic():
                QuotaReservation.objects.select_for_update().get(pk=busy.pk)
                locked.set()
                done.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=settling)
    thread.start()
    try:
        assert locked.wait(10)
        assert reservations_sweep() == []  # at once: SKIP LOCKED
    finally:
        done.set()
        thread.join()
    assert [row["tokens"] for row in reservations_sweep()] == [100]  # the next run takes it
