"""The Celery app of test_month_end_to_end's worker subprocess: QwenHub's own app on a queue of the test's.

`celery -A billing.tests.month_worker worker` runs QwenHub's tasks unchanged; only the default
queue is the test's (QWENHUB_TEST_QUEUE), so the tasks the worker fans out itself (a close per
team-month, the statements after a finalize) stay on that queue, and a message the killed worker
left unacknowledged can only ever come back there, never to another test's or a real worker.
With QWENHUB_TEST_LOG_LEVEL set (test_leaks_everywhere: DEBUG), the worker logs at that level
whatever its --loglevel says, so a test can search everything it could write.
"""
import os

from qwenhub.celery import app

app.conf.task_default_queue = os.environ["QWENHUB_TEST_QUEUE"]

if level := os.environ.get("QWENHUB_TEST_LOG_LEVEL"):
    from celery.signals import after_setup_logger, after_setup_task_logger

    @after_setup_logger.connect
    @after_setup_task_logger.connect
    def _log_level(logger, **kwargs):
        logger.setLevel(level)

__all__ = ["app"]
