# ollama-lb: every target sets up what it needs (a venv in .venv from pyproject.toml).
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
CONFIG  ?= config.yaml

.DEFAULT_GOAL := help
.PHONY: help install run demo test lint bench wheel test-deploy clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the appliance with its test tools (idempotent)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: install ## run the appliance with ./config.yaml (one node at 127.0.0.1:11434)
	$(VENV)/bin/ollama-lb $(CONFIG)

demo: install ## the appliance plus three simulated nodes on loopback, until Ctrl-C
	$(VENV)/bin/ollama-lb demo

test: install ## the test suite: unit, integration, chaos, process and deploy-file checks
	$(PY) -m pytest -m "not deploy"

lint: install ## ruff over the code and the tests; import-linter's layer contracts (setup.cfg)
	$(VENV)/bin/ruff check app pipeline tests
	$(VENV)/bin/lint-imports

bench: install ## benchmarks with side-by-side baselines; report in bench-results/ (BENCH_ARGS=--quick)
	mkdir -p bench-results
	$(PY) -m pytest tests/bench -p no:cacheprovider --benchmark-only -q \
		--benchmark-columns=min,median,max --benchmark-json=bench-results/ring.json
	$(PY) tests/bench/harness.py $(BENCH_ARGS)

wheel: install ## build the wheel into dist/ (what deploy/install.sh installs)
	$(PY) -m pip wheel --quiet --no-deps -w dist .

test-deploy: install ## the deploy scripts on a booted systemd (root, systemd-nspawn)
	$(PY) -m pytest tests/deploy -m deploy -v

clean: ## remove the venv and build output
	rm -rf $(VENV) build dist *.egg-info
