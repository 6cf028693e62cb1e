# cloudfed: `make demo` runs a local federation, `make test` runs the tests.
# Both create .venv and install everything they need on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
BUF_DIR := .cache/buf
BUF    := $(BUF_DIR)/node_modules/.bin/buf

.PHONY: venv demo test lint typecheck proto proto-check buf-lint ci bench clean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when pyproject.toml changes or the interpreter was (re)created.
$(STAMP): pyproject.toml $(PY)
	$(PIP) install -q --upgrade pip
	# CPU build from the local wheel store; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(PY) -m agent.demo

test: venv
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check common server agent tests bench protos/generate.py
	$(VENV)/bin/ruff format --check common server agent tests bench protos/generate.py

typecheck: venv
	$(VENV)/bin/mypy common server agent bench

proto: venv
	$(PY) -m protos.generate

# Regenerate and fail if the committed code differs.
proto-check: proto
	git diff --exit-code -- protos/ || (echo "generated protobuf code is stale: run 'make proto' and commit" >&2; exit 1)
	test -z "$$(git status --porcelain -- protos/)" || (git status --porcelain -- protos/; echo "untracked generated files" >&2; exit 1)

$(BUF):
	npm install --silent --prefix $(BUF_DIR) @bufbuild/buf@1.75.0

buf-lint: $(BUF)
	cd protos && ../$(BUF) lint

bench: venv
	$(PY) -m bench.transport
	$(PY) -m bench.secagg
	$(PY) -m bench.ring
	$(PY) -m bench.quality
	$(PY) -m bench.trainer
	$(PY) -m bench.data
	$(PY) -m bench.data --kind completion
	$(PY) -m bench.token_store
	$(PY) -m bench.dp
	$(PY) -m bench.noisy_evals
	$(PY) -m bench.memory
	$(PY) -m bench.memory --dp
	-$(PY) -m bench.cpu_threads  # needs root (it makes a cgroup)

ci: lint typecheck buf-lint proto-check test

clean:
	rm -rf $(VENV) $(BUF_DIR) .pytest_cache .mypy_cache .ruff_cache
