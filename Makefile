# make run: set up everything on a Debian machine (as root) and serve with config.toml.
# make test: the same set-up, then lint, type check and the whole test suite.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config.toml
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest services node proto bench clean cluster

run: $(STAMP) services
	$(BIN)/eventbus serve --config $(CONFIG)

test: $(STAMP) services node browser lint typecheck pytest

$(VENV)/bin/python:
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv python3-pip)
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(VENV)/bin/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

services: $(STAMP)
	$(BIN)/python scripts/services.py $(CONFIG)

# The Node.js client test of the gRPC contract needs @grpc/grpc-js.
node: tests/node/node_modules/.package-lock.json

tests/node/node_modules/.package-lock.json: tests/node/package.json tests/node/package-lock.json
	@command -v npm >/dev/null || (apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm)
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error

# The admin page's browser tests drive headless Chromium through chromedriver.
.PHONY: browser
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
		chromium chromium-driver)

lint: $(STAMP)
	$(BIN)/ruff check eventbus tests scripts $(wildcard bench)
	$(BIN)/ruff format --check eventbus tests scripts $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

# make cluster: three RabbitMQ nodes, a PostgreSQL primary and standby, and two daemons on this
# machine (beside its own servers), until Ctrl-C.
cluster: $(STAMP)
	$(BIN)/python scripts/cluster.py run

# make test-cluster: the fault tests on a real cluster of this machine's own (scripts/cluster.py:
# three RabbitMQ nodes, a PostgreSQL primary and standby, three daemons; as root, a few minutes).
.PHONY: test-cluster
test-cluster: $(STAMP) services
	$(BIN)/pytest -q -s tests/cluster --cluster

proto: $(STAMP)
	$(BIN)/python scripts/generate_protos.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache tests/node/node_modules
