# teamtrack: bootstrap a fresh Debian machine, test, lint and run the local demo.
#
#   make test    system packages + virtualenv, then the whole test suite
#   make demo    the same bootstrap, then a local cluster with 3 teams of 50 simulated workers
#   make bench   the same bootstrap, then the reference benchmark (docs/benchmarks/README.md);
#                BENCH_ARGS adds options, e.g. make bench BENCH_ARGS="--shape few"
#   make faults  the same bootstrap, then every fault scenario (tests/faults/, the Kafka cluster's
#                node kills), the long ones included: `make test` runs a representative subset
#
# Runs as root on a fresh machine (CI) or as a user with sudo. Debian's `prometheus` package
# (prometheus and promtool, for tests/test_prometheus.py) would start a system-wide service where
# systemd runs; system-deps stops and disables it: the tests start their own on loopback.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test
.DELETE_ON_ERROR:

# Debian keeps mosquitto and redis-server in /usr/sbin, which is not on every user's PATH.
export PATH := $(PATH):/usr/sbin:/sbin

PYTHON ?= python3
VENV := .venv
# Every Python dependency pinned with its hashes (`make lock` writes them from pyproject.toml):
# what the services run on (the demo, the image), and that with the tests' and the bench's tools.
RUN_LOCK := requirements.lock
LOCK := requirements-dev.lock
# Touched after a successful install, so an install re-runs only when its lock file changes.
VENV_STAMP := $(VENV)/.installed-from-$(LOCK)
RUN_STAMP := $(VENV)/.installed-from-$(RUN_LOCK)
TEST_OUTPUT := test-output
SYSTEM_COMMANDS := mosquitto mosquitto_passwd mosquitto_sub mosquitto_pub redis-server cc
SYSTEM_PACKAGES := mosquitto mosquitto-clients redis-server gcc libc6-dev
# Leaflet and friends, installed from the lock file and copied into the git-ignored vendor folder.
FRONTEND := dashboard/frontend
VENDOR := dashboard/static/vendor
ASSETS_STAMP := $(VENDOR)/.installed-from-package-lock
# The tests' own tools (Chromium, zbar, PostgreSQL); `make demo` needs none of them.
TEST_TOOLS := yes
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || ! command -v sudo >/dev/null 2>&1 || echo sudo)

.PHONY: bootstrap system-deps venv venv-run assets kafka-jars test faults demo bench lint clean lock

bootstrap: system-deps venv

system-deps:
	@missing=""; \
	for command in $(SYSTEM_COMMANDS); do \
		command -v "$$command" >/dev/null 2>&1 || missing="$$missing $$command"; \
	done; \
	packages=""; \
	if [ -n "$$missing" ]; then packages="$(SYSTEM_PACKAGES)"; fi; \
	if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
		missing="$$missing python3-venv"; packages="$$packages python3 python3-venv"; \
	fi; \
	command -v npm >/dev/null 2>&1 || { missing="$$missing npm"; packages="$$packages npm"; }; \
	if [ "$(TEST_TOOLS)" = yes ]; then \
		command -v chromium >/dev/null 2>&1 || { missing="$$missing chromium"; packages="$$packages chromium"; }; \
		command -v zbarimg >/dev/null 2>&1 || { missing="$$missing zbarimg"; packages="$$packages zbar-tools"; }; \
		for command in prometheus promtool; do \
			command -v "$$command" >/dev/null 2>&1 || { missing="$$missing $$command"; packages="$$packages prometheus"; }; \
		done; \
		if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
			missing="$$missing initdb"; packages="$$packages postgresql"; \
		fi; \
	fi; \
	if [ -z "$$missing" ]; then \
		echo "system-deps: all present, nothing to install"; \
	else \
		echo "system-deps: missing$$missing; installing$$packages"; \
		$(SUDO) apt-get update; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends $$packages; \
		if [[ " $$packages " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then \
			echo "system-deps: the tests start their own Prometheus; stopping the package's service"; \
			$(SUDO) systemctl disable --now prometheus.service || true; \
		fi; \
	fi

# $(1): the lock file installed into the virtualenv (created if missing), then the project
# itself, editable.
define install-lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "venv: $(PYTHON) is $$($(PYTHON) --version 2>&1); teamtrack needs Python >= 3.11" >&2; \
		exit 1; }
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes -r $(1)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
endef

# The whole development environment (make test, faults, bench, lint): the dev lock, which
# holds the services' pins too.
venv: $(VENV_STAMP)

$(VENV_STAMP): $(LOCK) pyproject.toml
	$(call install-lock,$(LOCK))
	touch $@ $(RUN_STAMP)

# What the demo runs on: the services' lock alone (about 160 MB, against 610 MB for the
# development environment); nothing to do where the development environment is installed.
venv-run: $(RUN_STAMP)

$(RUN_STAMP): $(RUN_LOCK) pyproject.toml
	$(call install-lock,$(RUN_LOCK))
	touch $@

# After a change of pyproject.toml's dependencies: the newest versions that satisfy it, pinned
# with their hashes (requirements.lock: the services' image; requirements-dev.lock: make test).
lock:
	[ -x $(VENV)-lock/bin/pip-compile ] || { $(PYTHON) -m venv $(VENV)-lock && \
		$(VENV)-lock/bin/pip install --quiet pip-tools; }
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)-lock/bin/pip-compile --quiet --generate-hashes \
		--strip-extras --allow-unsafe --no-emit-find-links --no-annotate \
		-o requirements.lock pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)-lock/bin/pip-compile --quiet --generate-hashes \
		--strip-extras --allow-unsafe --no-emit-find-links --no-annotate --extra dev --extra bench \
		-o requirements-dev.lock pyproject.toml

assets: $(ASSETS_STAMP)

$(ASSETS_STAMP): $(FRONTEND)/package-lock.json | system-deps
	cd $(FRONTEND) && npm ci --no-audit --no-fund --loglevel=error
	rm -rf $(VENDOR)/leaflet && mkdir -p $(VENDOR)/leaflet
	cp -r $(addprefix $(FRONTEND)/node_modules/leaflet/dist/,leaflet.js leaflet.css images) $(VENDOR)/leaflet/
	touch $@

# The Apache Kafka broker of the tests and of `teamtrack up --backend kafka`: its jars come from
# Maven Central into the git-ignored var/kafka-libs, once (teamtrack/local/kafka_server.py).
kafka-jars: venv
	@if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then \
		echo "kafka-jars: java and mvn are needed to fetch and run the Kafka broker;" \
			"installing maven and a Java runtime"; \
		$(SUDO) apt-get update; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends maven default-jre-headless; \
	fi
	$(VENV)/bin/python -m teamtrack.local.kafka_server

test: bootstrap assets kafka-jars
	mkdir -p $(TEST_OUTPUT)
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not extended" \
		--junitxml=$(TEST_OUTPUT)/junit.xml 2>&1 | tee $(TEST_OUTPUT)/pytest.log

# Every fault scenario, each printing what was acknowledged, stored and shown (about 10 min).
faults: bootstrap assets kafka-jars
	mkdir -p $(TEST_OUTPUT)
	$(VENV)/bin/pytest -q -s -p no:cacheprovider -m "faults or extended" \
		--junitxml=$(TEST_OUTPUT)/faults.xml 2>&1 | tee $(TEST_OUTPUT)/faults.log

# The Redis demo: no Java, Maven, Kafka jars, Chromium or PostgreSQL (`make test` installs them).
demo: TEST_TOOLS := no
demo: system-deps venv-run assets
	$(VENV)/bin/teamtrack up --teams 3 --workers 50

# The reference run: every scenario, both load shapes, the default ladder and fixed rates.
# It takes 15 to 30 minutes and needs a quiet machine; the report goes to reports/.
BENCH_ARGS ?=
bench: bootstrap kafka-jars
	$(VENV)/bin/teamtrack bench $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf state/ $(TEST_OUTPUT)/
