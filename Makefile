# Two commands matter: `make run` starts the service, `make test` runs the checks.
# Every target installs what it needs into .venv first, in two steps with a stamp each (named after the hash of
# the pyproject files, so nothing is reinstalled while they are unchanged): serving (the project with the tf
# extra for the embedded backend, and the client) for `make run`; then the dev extra (pytest, ruff, playwright,
# mkdocs, ...) for `make test`, so `make test` after `make run` adds only the rest. pip shows its progress when
# make runs in a terminal and is quiet otherwise (CI logs).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
HASH   := $(shell cat pyproject.toml clients/python/pyproject.toml | (sha256sum 2>/dev/null || shasum -a 256) | cut -c1-16)
# The extras each step installs (tests/test_install.py checks that the serving set holds no dev-only package).
RUN_EXTRAS  := tf
TEST_EXTRAS := tf,dev
RUN_STAMP   := $(VENV)/.installed-run-$(HASH)
TEST_STAMP  := $(VENV)/.installed-dev-$(HASH)
PIP_INSTALL  = $(BIN)/python -m pip install $$(test -t 1 || echo --quiet)
export QUICKDRAW_SAMPLE_DIR ?= $(abspath ../shared/quickdraw)
# The import contracts are checked on this checkout's packages, the client's (clients/python/src) included,
# whatever the virtualenv's editable installs point at (a git worktree sharing another checkout's .venv).
LINT_IMPORTS = PYTHONPATH=$(CURDIR)/clients/python/src$${PYTHONPATH:+:$$PYTHONPATH} $(BIN)/lint-imports --no-cache
# The browser test drives this Chromium (Debian's package) with Playwright; nothing downloads a browser.
export QUICKDRAW_CHROMIUM ?= /usr/bin/chromium
# mkdocs-material prints a banner about its successor on every build unless told not to.
export NO_MKDOCS_2_WARNING := 1

.PHONY: install install-dev browser go-toolchain run train test docs docs-serve dist lint protos stubs bench \
	reliability rehearsal soak images image-test clean help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' \
	  '{name[NR] = $$1; text[NR] = $$2; if (length($$1) > w) w = length($$1)} \
	   END {for (i = 1; i <= NR; i++) printf "  make %-*s  %s\n", w, name[i], text[i]}'

install: $(RUN_STAMP) ## create .venv and install what serving needs: the project with the tf extra, and the client

install-dev: $(TEST_STAMP) ## install also the dev extra (tests, lint, docs); make test does this

$(RUN_STAMP): pyproject.toml clients/python/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) -e ./clients/python -e '.[$(RUN_EXTRAS)]'
	@rm -f $(VENV)/.installed-run-* $(VENV)/.installed-[0-9a-f]*
	@touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(PIP_INSTALL) -e ./clients/python -e '.[$(TEST_EXTRAS)]'
	@rm -f $(VENV)/.installed-dev-*
	@touch $@

browser: ## install Debian's chromium for the browser test when it is missing (as root, with apt-get; else the test skips)
	@if [ -x "$(QUICKDRAW_CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "browser: no $(QUICKDRAW_CHROMIUM), and apt-get needs root to install it: the browser test will skip"; \
	else \
	  echo "browser: installing Debian's chromium for the browser test (apt-get install chromium)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium fonts-dejavu-core >/dev/null; } || echo "browser: apt-get failed: the browser test will skip"; \
	fi

GO_PACKAGES := golang-go protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev

go-toolchain: ## install Debian's Go toolchain, protoc plugins and grpc-go for the Go client example (as root; else it skips)
	@if command -v go >/dev/null 2>&1 && command -v protoc-gen-go-grpc >/dev/null 2>&1 \
	    && [ -d /usr/share/gocode/src/google.golang.org/grpc ]; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "go-toolchain: no go, protoc-gen-go-grpc or grpc-go, and apt-get needs root: the Go example test will skip"; \
	else \
	  echo "go-toolchain: installing Debian's $(GO_PACKAGES)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      $(GO_PACKAGES) >/dev/null; } || echo "go-toolchain: apt-get failed: the Go example test will skip"; \
	fi

run: $(RUN_STAMP) ## start the gateway on the shipped model (gRPC :50051; playground, JSON API and metrics on :8080)
	$(BIN)/quickdraw serve $(ARGS)

train: $(RUN_STAMP) ## retrain the shipped model on the sample data (next version under models/quickdraw), then evaluate it
	@# stage 1: the qdnet recipe on the known classes alone (runs/base); stage 2: 4 epochs of outlier exposure from it
	rm -rf runs/base
	$(BIN)/quickdraw train --data $(QUICKDRAW_SAMPLE_DIR) --no-outlier-exposure --out runs/base --version 1 \
	  --workdir runs/base-work $(ARGS)
	$(BIN)/quickdraw train --data $(QUICKDRAW_SAMPLE_DIR) --init-from runs/base/1 --epochs 4 --learning-rate 4e-4 \
	  --out models/quickdraw --workdir runs/oe $(ARGS)
	$(BIN)/quickdraw evaluate models/quickdraw --data $(QUICKDRAW_SAMPLE_DIR)

test: $(TEST_STAMP) browser go-toolchain ## ruff, the import contracts, the docs site (mkdocs --strict: no broken link), then the whole test suite (the browser test uses Debian's chromium, the Go example Debian's Go)
	$(BIN)/ruff check .
	$(LINT_IMPORTS)
	$(BIN)/mkdocs build --strict --quiet --site-dir build/site
	$(BIN)/python -m pytest

docs: $(TEST_STAMP) ## build the docs site into build/site (mkdocs --strict); open build/site/index.html
	$(BIN)/mkdocs build --strict --site-dir build/site

docs-serve: $(TEST_STAMP) ## serve the docs on http://localhost:8000 with live reload
	$(BIN)/mkdocs serve

dist: $(RUN_STAMP) ## wheels of the service and of the client (clients/python) into dist/
	$(BIN)/python -m pip wheel --no-deps --wheel-dir dist ./clients/python .

lint: $(TEST_STAMP) ## ruff, then the import contracts (lint-imports: layers, no cycles; pyproject.toml [tool.importlinter])
	$(BIN)/ruff check .
	$(LINT_IMPORTS)

protos: $(TEST_STAMP) ## regenerate the Python code for protos/ and the TF Serving descriptor set (reproducible)
	$(BIN)/python scripts/gen_protos.py

stubs: $(TEST_STAMP) ## Go and TypeScript client stubs under build/stubs (buf and protoc plugins; docs/clients.md)
	$(BIN)/python scripts/stubs.py

bench: $(TEST_STAMP) ## benchmarks: each compares two things in one run and prints ratios
	$(BIN)/python -m benchmarks

reliability: $(TEST_STAMP) ## the fault tests (real processes, every call counted), then RELIABILITY.md from their tallies
	$(BIN)/python -m pytest -q tests/test_reliability.py
	$(BIN)/python scripts/reliability_report.py

rehearsal: $(TEST_STAMP) ## 3 TF Serving stand-ins, 2 gateways, Prometheus under load: roll-out, label moves, rollback, kills (< 10 min)
	$(BIN)/python scripts/rehearsal.py $(ARGS)

soak: $(TEST_STAMP) ## ten minutes of steady load on a real gateway: no errors, RSS growth under 5% (SOAK_DURATION_S)
	$(BIN)/python scripts/soak.py

images: ## build the container images with podman (as root: apt-get installs podman, debootstrap, runc if missing)
	scripts/images.sh

image-test: $(TEST_STAMP) ## run the slim gateway image against the TF Serving stand-in: serve, classify, health, drain, sizes
	$(BIN)/python scripts/image_test.py

clean: ## remove the virtualenv, caches and build outputs
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info test-artifacts .bench
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
