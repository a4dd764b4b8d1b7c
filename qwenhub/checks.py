"""Deploy checks: `manage.py check --deploy` errors on embedded-only settings."""
from django.conf import settings
from django.core.checks import Error, Tags, Warning, register


@register(Tags.database, deploy=True)
def check_production_database(app_configs, **kwargs):
    if settings.DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
        return [
            Error(
                "SQLite is for trying QwenHub on one machine: quotas and money need PostgreSQL.",
                hint="Set DATABASE_URL=postgres://user:password@host:5432/qwenhub.",
                id="qwenhub.E001",
            )
        ]
    return []


@register(Tags.caches, deploy=True)
def check_production_cache(app_configs, **kwargs):
    if not settings.QWENHUB_LIMITS_REDIS_URL:
        return [
            Warning(
                "No REDIS_URL: rate limits and fair queueing are per gateway process only.",
                hint="Set REDIS_URL=redis://host:6379/0 so every gateway process shares them.",
                id="qwenhub.W001",
            )
        ]
    return []
