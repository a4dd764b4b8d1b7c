"""The catalog's Celery tasks (the schedule is CELERY_BEAT_SCHEDULE in settings)."""
from celery import shared_task

from proxy.health import upstream_health_scrape_all


@shared_task(ignore_result=True)
def upstream_health_scrape_task() -> int:
    """Every minute: sample each enabled upstream's vLLM /metrics and drop samples older than 24 h.

    A down upstream is recorded as such (proxy.health), so the task itself does not fail;
    a run that comes late or twice only adds a sample. Returns how many upstreams it read.
    """
    return upstream_health_scrape_all()
