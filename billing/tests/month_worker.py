"""The Celery app of test_month_end_to_end's worker subprocess: QwenHub's own app on a queue of the test's.

`celery -A billing.tests.month_worker worker` runs QwenHub's tasks unchanged; only the default
queue is the test's (QWENHUB_TEST_QUEUE), so the tasks the worker fans out itself (a close per
team-month, the statements after a finalize) stay on that queue, and a message the killed worker
left unacknowledged can only ever come back there, never to another test's or a real worker.
"""
import os

from qwenhub.celery import app

app.conf.task_default_queue = os.environ["QWENHUB_TEST_QUEUE"]

__all__ = ["app"]
