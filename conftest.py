"""Project-wide test fixtures: real PostgreSQL and Redis, or a clear failure."""
import pytest
from django.core.cache import cache


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
