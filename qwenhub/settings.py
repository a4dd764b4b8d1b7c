"""QwenHub settings: one file, driven by the environment.

With no variables set QwenHub runs embedded: SQLite (WAL), a local-memory cache,
Celery tasks run in-process, and the built-in vLLM simulator as the upstream.
Production sets DATABASE_URL (PostgreSQL), REDIS_URL, EMAIL_URL, SECRET_KEY,
DEBUG=false and ALLOWED_HOSTS. `.env.example` documents every variable.
"""
import os
from pathlib import Path

import environ
from celery.schedules import crontab

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()
# The dotenv file read under the real environment (which wins): .env beside manage.py, another
# file, or none (QWENHUB_ENV_FILE=""; `make run` sets that, so a production .env lying in the
# checkout cannot turn the embedded default into a half-configured production).
ENV_FILE = os.environ.get("QWENHUB_ENV_FILE", str(BASE_DIR / ".env"))
if ENV_FILE:
    environ.Env.read_env(ENV_FILE)

DEV_SECRET_KEY = "django-insecure-qwenhub-dev-only"
# Embedded mode (no DATABASE_URL) is for one laptop and defaults to DEBUG on;
# anything pointed at a real database defaults to DEBUG off.
EMBEDDED = not env("DATABASE_URL", default="")
DEBUG = env.bool("DEBUG", default=EMBEDDED)
SECRET_KEY = env("SECRET_KEY", default="") or DEV_SECRET_KEY  # empty counts as unset
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# --- HTTPS: on by default in production (DEBUG off), off in the embedded default -----------
# QWENHUB_HTTPS=false turns all of it off at once (a site on plain HTTP in a trusted network);
# each setting can also be set on its own. `manage.py check --deploy` is clean with the defaults.
QWENHUB_HTTPS = env.bool("QWENHUB_HTTPS", default=not DEBUG)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=QWENHUB_HTTPS)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=QWENHUB_HTTPS)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=QWENHUB_HTTPS)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000 if QWENHUB_HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=QWENHUB_HTTPS)
# Asking browsers to preload HSTS is a commitment of the whole domain: opt in.
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
# The TLS-terminating proxy in front says the original scheme in this header ("" = no proxy:
# then uvicorn itself must serve HTTPS, or the SSL redirect loops).
_proxy_header = env("SECURE_PROXY_SSL_HEADER", default="X-Forwarded-Proto" if QWENHUB_HTTPS else "")
SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_header.upper().replace("-", "_"), "https") if _proxy_header else None
# Security headers on every page (SecurityMiddleware, XFrameOptionsMiddleware).
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
# Without preload, Django's deploy check W021 (it only asks for the opt-in above) is silenced.
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]

if not DEBUG and SECRET_KEY.startswith("django-insecure-"):
    from django.core.exceptions import ImproperlyConfigured

    _read = f" and {ENV_FILE}" if ENV_FILE and Path(ENV_FILE).exists() else ""
    raise ImproperlyConfigured(
        "QwenHub refuses to start with DEBUG off and the development SECRET_KEY. "
        "Set SECRET_KEY to a long random value (python -c 'import secrets; "
        "print(secrets.token_urlsafe(50))'), or set DEBUG=true for local development. "
        f"Settings were read from the environment{_read}; `make run` (the embedded default) reads no .env."
    )

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served locally (no CDN)
    "tenants",
    "proxy",
    "billing",
    "dashboards",  # the members' and team admins' pages
    "api",  # the management REST API
    "qwenhub",  # project-wide commands (demo) and checks
]

# The /v1 gateway does not pass through this stack: qwenhub.asgi sends /v1 to
# proxy.gateway directly, so no sync middleware sits on the hot path.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's and dashboards' static files under uvicorn (no web server needed).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # The pages' language follows the browser (Accept-Language) unless the person chose one.
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "qwenhub.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "dashboards.context.dashboard",
            ],
        },
    },
]
WSGI_APPLICATION = "qwenhub.wsgi.application"
ASGI_APPLICATION = "qwenhub.asgi.application"

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            # WAL lets the dashboards read while the gateway writes usage rows.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    )
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=60))
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
    # Fail fast when PostgreSQL is down instead of hanging the gateway.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env.int("QWENHUB_DB_CONNECT_TIMEOUT", default=3)
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Connections each gateway process keeps for its hot-path statements (PostgreSQL only).
QWENHUB_DB_POOL_SIZE = env.int("QWENHUB_DB_POOL_SIZE", default=8)
# Seconds a request waits for one of them before a 503.
QWENHUB_DB_POOL_TIMEOUT = env.float("QWENHUB_DB_POOL_TIMEOUT", default=3.0)

# One Redis for the cache, rate limits, fair queueing and the Celery broker.
REDIS_URL = env("REDIS_URL", default="")
CACHE_URL = env("CACHE_URL", default=REDIS_URL)
if CACHE_URL.startswith(("redis://", "rediss://", "unix://")):
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": CACHE_URL,
            "KEY_PREFIX": "qh",
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
# Redis used by the gateway for rate limits and fair queueing ("" = per-process only).
QWENHUB_LIMITS_REDIS_URL = env("QWENHUB_LIMITS_REDIS_URL", default=REDIS_URL)

CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default=None)
CELERY_TASK_ALWAYS_EAGER = env.bool(
    "CELERY_TASK_ALWAYS_EAGER", default=CELERY_BROKER_URL == "memory://"
)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TIMEZONE = "UTC"
# The schedule, in code (docker-compose's beat, and `make run`'s embedded worker, run it).
# Times are UTC; each task works out every team's month in the team's own time zone.
CELERY_BEAT_SCHEDULE = {
    # Closes each team's month within the hour after its midnight on the 1st, and opens
    # the new month's quota counters (billing.tasks.periods_close_due_task).
    "billing-periods-close-due": {  # https://crontab.guru/#5_*_*_*_*
        "task": "billing.tasks.periods_close_due_task",
        "schedule": crontab(minute=5),
        "options": {"expires": 55 * 60},
    },
    # Issues closed months whose grace_days have passed, then their statements.
    "billing-periods-finalize-due": {  # https://crontab.guru/#20_2_*_*_*
        "task": "billing.tasks.periods_finalize_due_task",
        "schedule": crontab(minute=20, hour=2),
        "options": {"expires": 12 * 3600},
    },
    # E-mails members at 80 % and at 100 % of a quota, once per level and month.
    "billing-quota-warnings": {  # https://crontab.guru/#*/15_*_*_*_*
        "task": "billing.tasks.quota_warnings_task",
        "schedule": crontab(minute="*/15"),
        "options": {"expires": 14 * 60},
    },
    # Samples each upstream's vLLM /metrics for the team page's GPU health (kept 24 h).
    "proxy-upstream-health": {  # https://crontab.guru/#*_*_*_*_*
        "task": "proxy.tasks.upstream_health_scrape_task",
        "schedule": crontab(),
        "options": {"expires": 50},
    },
    # Gives back reservations whose request never settled (billing.tasks.reservations_sweep_task).
    "billing-reservations-sweep": {  # https://crontab.guru/#*/5_*_*_*_*
        "task": "billing.tasks.reservations_sweep_task",
        "schedule": crontab(minute="*/5"),
        "options": {"expires": 4 * 60},
    },
    # Rolls the days over for good up into daily totals, which the charts read (billing.services.rollups).
    "billing-usage-days-roll": {  # https://crontab.guru/#3-59/10_*_*_*_*
        "task": "billing.tasks.usage_days_roll_task",
        "schedule": crontab(minute="3-59/10"),
        "options": {"expires": 9 * 60},
    },
}

# Embedded, e-mails (statements, quota warnings) are written to files under data/mail
# (`make run` says so); elsewhere, without EMAIL_URL, they are printed to the log.
MAIL_DIR = BASE_DIR / "data" / "mail"
EMAIL_CONFIG = env.email("EMAIL_URL", default="filemail://" if EMBEDDED else "consolemail://")
vars().update(EMAIL_CONFIG)
if EMAIL_CONFIG["EMAIL_BACKEND"].endswith("filebased.EmailBackend") and not EMAIL_CONFIG.get("EMAIL_FILE_PATH"):
    EMAIL_FILE_PATH = str(MAIL_DIR)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="QwenHub <qwenhub@localhost>")

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
# The language of e-mails (statements, invitations) and of pages for browsers that ask for none
# of LANGUAGES; a page otherwise follows the browser's Accept-Language or the switcher.
LANGUAGE_CODE = env("LANGUAGE_CODE", default="en")
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
LOCALE_PATHS = [BASE_DIR / "locale"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "member:home"
# Seconds a password-reset or invitation link stays valid (each works once): 3 days.
PASSWORD_RESET_TIMEOUT = env.int("PASSWORD_RESET_TIMEOUT", default=3 * 24 * 3600)
# Failed sign-ins allowed per account and per client address within the window (seconds);
# more are refused with 429 before the password is checked (dashboards/accounts/throttle.py).
QWENHUB_LOGIN_FAILURES_PER_ACCOUNT = env.int("QWENHUB_LOGIN_FAILURES_PER_ACCOUNT", default=5)
QWENHUB_LOGIN_FAILURES_PER_ADDRESS = env.int("QWENHUB_LOGIN_FAILURES_PER_ADDRESS", default=20)
QWENHUB_LOGIN_FAILURE_WINDOW = env.int("QWENHUB_LOGIN_FAILURE_WINDOW", default=15 * 60)
# The client address is REMOTE_ADDR; only with this set is X-Forwarded-For's last entry used.
QWENHUB_LOGIN_TRUST_X_FORWARDED_FOR = env.bool("QWENHUB_LOGIN_TRUST_X_FORWARDED_FOR", default=False)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Embedded mode has no collectstatic step: serve straight from the apps' folders.
WHITENOISE_USE_FINDERS = DEBUG

# The management API (/api/v1/ and /v1/organization/): a member's QwenHub key as a Bearer
# token, or the signed-in session (with CSRF); JSON only; one error shape (api.errors).
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api.authentication.ApiKeyAuthentication",  # first: an anonymous call gets 401 + WWW-Authenticate
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["api.parsers.JSONParser"],  # DRF's, deep nesting a 400 too
    "DEFAULT_SCHEMA_CLASS": "api.schema.AutoSchema",
    "EXCEPTION_HANDLER": "api.errors.exception_handler",
    # Per signed-in user (or per key's user), counted in Django's cache (Redis in production).
    "DEFAULT_THROTTLE_CLASSES": ["rest_framework.throttling.UserRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"user": env("QWENHUB_API_RATE", default="600/minute")},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "QwenHub management API",
    "DESCRIPTION": "Members' keys, usage, quotas and invoices; team admins' members, periods and audit trail; "
                   "OpenAI-style organization usage and costs. Errors: {\"error\": {\"type\", \"message\", \"fields\"}}.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/(api/v1|v1/organization)",
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "UsageStatusEnum": "billing.models.UsageRecord.Status",
        "PeriodStatusEnum": "billing.models.BillingPeriod.Status",
        "AuditKindEnum": "tenants.models.AuditEvent.Kind",
        "UsageResultObjectEnum": ["organization.usage.completions.result"],
        "CostResultObjectEnum": ["organization.costs.result"],
        "BucketObjectEnum": ["bucket"],
        "PageObjectEnum": ["page"],
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# --- QwenHub's own knobs -------------------------------------------------------
# Upstream used by `manage.py demo` and `make run` (the built-in simulator).
QWENHUB_SIMULATOR_URL = env("QWENHUB_SIMULATOR_URL", default="http://127.0.0.1:8001/v1")
# Largest request body the gateway accepts (bytes); larger → 413.
QWENHUB_MAX_BODY_BYTES = env.int("QWENHUB_MAX_BODY_BYTES", default=2 * 1024 * 1024)
# Seconds a /v1 request's body may take to arrive; a stalled upload is answered 408.
QWENHUB_BODY_TIMEOUT = env.float("QWENHUB_BODY_TIMEOUT", default=30.0)
# How long an API key's record is cached in each gateway process (revocation delay).
QWENHUB_KEY_CACHE_SECONDS = env.float("QWENHUB_KEY_CACHE_SECONDS", default=3.0)
# Invalid /v1 keys one client address may present per minute (per gateway process) before 429s.
QWENHUB_BAD_KEYS_PER_MINUTE = env.int("QWENHUB_BAD_KEYS_PER_MINUTE", default=30)
# Seconds between each gateway process's batched writes of API keys' last_used_at.
QWENHUB_LAST_USED_FLUSH_SECONDS = env.float("QWENHUB_LAST_USED_FLUSH_SECONDS", default=30.0)
# How long each gateway process caches the routing table (models, aliases, upstreams).
QWENHUB_ROUTES_CACHE_SECONDS = env.float("QWENHUB_ROUTES_CACHE_SECONDS", default=5.0)
# Seconds to wait for an upstream's first byte before answering 504.
QWENHUB_UPSTREAM_TIMEOUT = env.float("QWENHUB_UPSTREAM_TIMEOUT", default=600.0)
QWENHUB_UPSTREAM_CONNECT_TIMEOUT = env.float("QWENHUB_UPSTREAM_CONNECT_TIMEOUT", default=3.0)
# A reservation older than the fair queue's wait + the upstream timeout + this margin (for
# the generation after the first byte) belongs to a request that died: the sweep gives it back.
QWENHUB_RESERVATION_MARGIN = env.float("QWENHUB_RESERVATION_MARGIN", default=1800.0)
# Seconds between upstream /health checks run by each gateway process.
QWENHUB_HEALTH_INTERVAL = env.float("QWENHUB_HEALTH_INTERVAL", default=5.0)
# Fair sharing of a saturated upstream: per-member queues served in turn.
QWENHUB_FAIR_QUEUE = env.bool("QWENHUB_FAIR_QUEUE", default=True)
# Seconds a request may wait for a free upstream slot before a 429.
QWENHUB_QUEUE_TIMEOUT = env.float("QWENHUB_QUEUE_TIMEOUT", default=60.0)
# Token used to scrape the gateway's /metrics (empty: loopback only).
QWENHUB_METRICS_TOKEN = env("QWENHUB_METRICS_TOKEN", default="")
# Where people reach this site: the links in statement e-mails start with it.
QWENHUB_PUBLIC_URL = env("QWENHUB_PUBLIC_URL", default="http://127.0.0.1:8000")
