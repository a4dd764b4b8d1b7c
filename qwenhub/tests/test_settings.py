"""Settings from the environment: production refuses the development key; deploy checks refuse SQLite."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

BASE_DIR = Path(settings.BASE_DIR)
POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/qwenhub_settings_test"  # never connected to
LOAD_SETTINGS = "import django; django.setup(); from django.conf import settings; print('DEBUG', settings.DEBUG)"


def run_python(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run Python in a clean environment holding only what the test names (plus PATH)."""
    clean = {"PATH": os.environ.get("PATH", ""), "DJANGO_SETTINGS_MODULE": "qwenhub.settings",
             "PYTHONDONTWRITEBYTECODE": "1", **env}
    return subprocess.run([sys.executable, *args], cwd=BASE_DIR, env=clean, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("secret", [None, "", "django-insecure-something"])
def test_production_refuses_the_development_secret_key(secret):
    env = {"DEBUG": "false", "DATABASE_URL": POSTGRES_URL}
    if secret is not None:
        env["SECRET_KEY"] = secret
    result = run_python(["-c", LOAD_SETTINGS], **env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "refuses to start with DEBUG off and the development SECRET_KEY" in result.stderr


def test_production_starts_with_a_real_secret_key():
    result = run_python(["-c", LOAD_SETTINGS], DEBUG="false", DATABASE_URL=POSTGRES_URL,
                        SECRET_KEY="a-real-secret-" + "x" * 40)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "DEBUG False"


def test_database_url_alone_means_debug_off():
    result = run_python(["-c", LOAD_SETTINGS], DATABASE_URL=POSTGRES_URL, SECRET_KEY="k" * 50)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "DEBUG False"


def test_check_deploy_refuses_sqlite():
    result = run_python(["manage.py", "check", "--deploy"], DEBUG="true")
    assert result.returncode != 0
    assert "qwenhub.E001" in result.stderr and "PostgreSQL" in result.stderr


def test_check_deploy_accepts_postgresql():
    result = run_python(["manage.py", "check", "--deploy"], DEBUG="false", DATABASE_URL=POSTGRES_URL,
                        SECRET_KEY="k" * 50, REDIS_URL="redis://127.0.0.1:6379/12")
    assert "System check identified" in result.stdout + result.stderr  # the checks ran
    assert "qwenhub.E001" not in result.stdout + result.stderr
    assert "qwenhub.W001" not in result.stdout + result.stderr


def settings_variables() -> set[str]:
    text = (BASE_DIR / "qwenhub" / "settings.py").read_text()
    return set(re.findall(r'\benv(?:\.\w+)?\(\s*"([A-Z][A-Z0-9_]*)"', text))


def documented(path: Path) -> set[str]:
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", path.read_text(), re.MULTILINE))


def test_env_example_documents_every_variable_settings_read():
    variables = settings_variables()
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "DEBUG"} <= variables  # the parser works
    assert variables - documented(BASE_DIR / ".env.example") == set()


def test_env_example_documents_every_variable_docker_compose_reads_and_holds_no_secret():
    compose = (BASE_DIR / "docker-compose.yml").read_text()
    variables = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose))
    assert {"SECRET_KEY", "POSTGRES_PASSWORD", "VLLM_API_KEY"} <= variables
    example = BASE_DIR / ".env.example"
    assert variables - documented(example) == set()
    values = dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", example.read_text(), re.MULTILINE))
    assert values["SECRET_KEY"] == values["POSTGRES_PASSWORD"] == values["VLLM_API_KEY"] == ""


PRODUCTION_DOTENV = "DEBUG=false\nSECRET_KEY=\nALLOWED_HOSTS=qwenhub.example.com\n"  # .env.example, unfilled


def test_a_half_filled_dotenv_is_refused_and_the_error_names_it(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text(PRODUCTION_DOTENV)
    result = run_python(["-c", LOAD_SETTINGS], QWENHUB_ENV_FILE=str(dotenv))
    assert result.returncode != 0 and "refuses to start" in result.stderr
    assert str(dotenv) in result.stderr and "make run" in result.stderr


def test_the_embedded_default_reads_no_dotenv(tmp_path):
    """`cp .env.example .env` in the checkout must not break `make run`."""
    dotenv = tmp_path / ".env"
    dotenv.write_text(PRODUCTION_DOTENV)
    load = "from qwenhub.run import embedded_environment; embedded_environment(); " + LOAD_SETTINGS
    result = run_python(["-c", load], QWENHUB_ENV_FILE=str(dotenv))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("DEBUG True")
