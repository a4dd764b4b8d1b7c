"""Project-wide test fixtures: real PostgreSQL and Redis, or a clear failure."""
import os

import pytest
from django.core.cache import cache

# The suite runs with DEBUG off over the test client's plain HTTP: no redirect to HTTPS
# (here and in the gateway processes tests start). The production default is tested in
# qwenhub/tests/test_deploy.py, in a clean environment.
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")


@pytest.fixture(autouse=True, scope="session")
def _plain_http():
    from django.conf import settings

    settings.SECURE_SSL_REDIRECT = False


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """Refuse to run database tests on anything but PostgreSQL (the README's test command sets it)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.exit("Tests need PostgreSQL: run them with `make test` (DATABASE_URL=postgres://…).", returncode=2)
    yield
    # Live servers and worker threads of the gateway may still hold connections to the
    # test database; end them so that pytest-django can drop it.
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()
    yield
