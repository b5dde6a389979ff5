# Developer entry points: `make install`, `make test`, `make demo`, `make bench`.

VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALL_STAMP := $(VENV)/.cdc-stream-installed
PG_PACKAGES := postgresql-15 postgresql-15-wal2json
SYSTEM_PACKAGES := $(PG_PACKAGES) redis-server chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

MAKEFLAGS += --no-print-directory

.PHONY: install system-packages test demo bench

install: system-packages $(INSTALL_STAMP)

# Install the PostgreSQL server and the wal2json plugin that the tests and the
# demo start their private clusters with, the redis-server that the tests
# of distributed mode start, and the chromium that the dashboard tests drive,
# when a Debian package is missing.
system-packages:
	@if ! command -v dpkg-query >/dev/null 2>&1; then \
		echo "dpkg-query not found: install PostgreSQL 15, wal2json and Redis by hand"; \
		exit 0; \
	fi; \
	missing=""; \
	for package in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$package" 2>/dev/null \
			| grep -q 'install ok installed' || missing="$$missing $$package"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(PYTHON):
	@echo "Creating $(VENV)"
	@python3 -m venv $(VENV)

# The stamp is newer than pyproject.toml once its dependencies are installed.
$(INSTALL_STAMP): pyproject.toml | $(PYTHON)
	@echo "Installing cdc-stream into $(VENV)"
	@$(PYTHON) -m pip install -q -e '.[test]'
	@touch $@

test: install
	@$(PYTHON) -m pytest

# The demo needs only PostgreSQL and wal2json from Debian. DEMO_DIR moves its
# files, e.g. to /tmp when the postgres OS user cannot enter this directory.
demo: SYSTEM_PACKAGES := $(PG_PACKAGES)
demo: install
	@$(VENV)/bin/cdc-stream demo $(if $(DEMO_DIR),--data-dir $(DEMO_DIR))

# Benchmarks, run by hand (docs/benchmarks.md); BENCH="ingest latency" picks
# some. The profile benchmark needs py-spy, which the app itself does not.
bench: install
	@$(VENV)/bin/py-spy --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q py-spy
	@$(PYTHON) -m bench $(BENCH)
