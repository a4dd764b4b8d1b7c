# QwenHub: `make run` (embedded demo) and `make test` (the whole suite) are all a new machine needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PYTHONDONTWRITEBYTECODE := 1

# What the tests run against (real services on loopback; .ci/run starts them).
TEST_ENV := SECRET_KEY=test-only-not-secret DEBUG=false \
	DATABASE_URL=$${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/qwenhub} \
	REDIS_URL=$${TEST_REDIS_URL:-redis://127.0.0.1:6379/15}

.PHONY: run test bench install install-dev check clean messages translations

# The pages' and e-mails' translations: .po files are the source (committed), compiled here
# with Babel (pure Python, no gettext needed on the machine).
LOCALE_MO := $(patsubst %.po,%.mo,$(wildcard locale/*/LC_MESSAGES/*.po))

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

locale/%.mo: locale/%.po $(VENV)/.installed
	$(BIN)/pybabel -q compile --use-fuzzy -i $< -o $@

messages: $(LOCALE_MO)

## Refresh the .po files from the code and templates (a developer's step; needs gettext).
translations: install
	SECRET_KEY=x DEBUG=true $(BIN)/python manage.py makemessages -l zh_Hans --no-obsolete --ignore=.venv --ignore=bench --ignore='*/tests/*'

## Run QwenHub embedded: SQLite, no Redis, the simulator as upstream, a demo team and key.
run: install messages
	$(BIN)/python -m qwenhub.run

## Run the whole test suite against PostgreSQL and Redis.
test: install-dev messages
	$(TEST_ENV) $(BIN)/python manage.py makemigrations --check --dry-run
	$(TEST_ENV) $(BIN)/python manage.py check
	$(TEST_ENV) $(BIN)/pytest $(PYTEST_ARGS)

## Benchmark the gateway against the simulator reached directly.
bench: install-dev
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) db.sqlite3 db.sqlite3-wal db.sqlite3-shm
