# Every target builds its own virtualenv from nothing on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export OTEL_PYTHON_CONTEXT := threadctx

# Python 3.14 and 3.15 come from a Debian unstable root (see .ci/new-pythons); one root can serve
# several trees: make test-new-pythons SID_ROOT=/path/to/.sid/root
SID_ROOT ?= .sid/root

.PHONY: demo test lint typecheck pytest pytest-oldest pytest-newest test-new-pythons soak soak-new-python docs conformance bench bench-new-pythons dist check-dist check-wheel pytest-pure pytest-pure-new-python clean

# pip 25.1 is the first to install PEP 735 dependency groups (--group); Python 3.10-3.13's venvs start older.
PIP_FOR_GROUPS := 'pip>=25.1'
# The compiled reader is built with warnings as errors here (see hatch_build.py); a user's install is not.
STRICT := THREADCTX_STRICT_BUILD=1
# The dependency group a venv gets (pyproject.toml): dev is test, lint, docs and benchmarks; CI's other
# interpreters, which only run pytest, take test.
GROUP ?= dev

$(VENV)/.installed: pyproject.toml hatch_build.py src/threadctx/_ctxread.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_FOR_GROUPS)
	$(STRICT) $(BIN)/pip install -q -e . --group $(GROUP)
	touch $@

demo: $(VENV)/.installed  ## the main job: a threaded HTTP service, every line checked against its request
	$(BIN)/python examples/demo.py

test: lint typecheck pytest docs  ## everything CI checks, but the conformance suites

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests examples benchmarks conformance docs hatch_build.py .ci/check_install.py
	$(BIN)/ruff format --check src tests examples benchmarks conformance docs hatch_build.py .ci/check_install.py
	$(BIN)/lint-imports --no-cache  # the layers of [tool.importlinter] in pyproject.toml

typecheck: $(VENV)/.installed
	$(BIN)/mypy

pytest: $(VENV)/.installed
	$(BIN)/pytest

# The pure-Python path: the registry mirror instead of the compiled reader, as on a free-threaded build
# or an install without a compiler (about 1 minute, and 2 on 3.14).
pytest-pure: $(VENV)/.installed  ## the tests without the compiled reader (THREADCTX_PURE_PYTHON=1)
	THREADCTX_PURE_PYTHON=1 $(BIN)/pytest

pytest-pure-new-python:  ## the same on 3.14 with -X thread_inherit_context=1, the free-threaded build's default
	THREADCTX_PURE_PYTHON=1 SID_FLAGS=1 SID_ROOT=$(SID_ROOT) .ci/new-pythons 3.14

pytest-oldest:  ## the tests on the oldest supported opentelemetry-api and -sdk (1.27), without contrib packages
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/pip install -q $(PIP_FOR_GROUPS)
	$(STRICT) .venv-oldest/bin/pip install -q -e . --group test-core 'opentelemetry-api==1.27.0' 'opentelemetry-sdk==1.27.0'
	.venv-oldest/bin/pytest

pytest-newest:  ## the tests on the newest opentelemetry-api, -sdk and contrib releases, beside the pinned ones (.ci/pytest-newest)
	$(PYTHON) .ci/pytest-newest --python $(PYTHON)

test-new-pythons:  ## the tests on Python 3.14 and 3.15, with -X thread_inherit_context=0 and =1 (needs root; builds .sid/ once)
	SID_ROOT=$(SID_ROOT) .ci/new-pythons

soak-new-python:  ## the long model, churn and logging runs on 3.14 with inheritance on, then at the smallest switch interval
	for interval in "" 1e-6; do \
	    THREADCTX_SWITCH_INTERVAL=$$interval THREADCTX_SOAK=long THREADCTX_MODEL_EXAMPLES=1000 SID_ROOT=$(SID_ROOT) \
	        SID_FLAGS=1 .ci/new-pythons 3.14 -- -s --timeout 1800 tests/test_model.py tests/test_soak.py || exit 1; \
	done

soak: $(VENV)/.installed  ## the long soak, model and fuzz runs of docs/reliability.md (about 10 minutes)
	THREADCTX_SOAK=long $(BIN)/pytest -m soak -s --timeout 1800
	THREADCTX_MODEL_EXAMPLES=1000 THREADCTX_FUZZ_EXAMPLES=5000 $(BIN)/pytest tests/test_model.py tests/test_hostile_input.py --timeout 1800

docs: $(VENV)/.installed  ## the documentation site, warnings are errors: docs/_build/html
	$(BIN)/sphinx-build -W --keep-going -b html -q docs docs/_build/html

conformance: $(VENV)/.installed  ## OpenTelemetry's own test suites, default backend vs threadctx
	$(BIN)/python conformance/run.py --python $(PYTHON)

# Ratios measured on 3.14 and 3.15 by bench-new-pythons, kept under each table by a new make bench.
OTHER_RATIOS = $(foreach file,$(wildcard .sid/bench-3.*.json),--other $(file))

bench: $(VENV)/.installed  ## writes docs/benchmarks.md (about 25 minutes; valgrind counts: python -m benchmarks.callgrind)
	$(BIN)/python -m benchmarks.run $(OTHER_RATIOS)

bench-new-pythons: $(VENV)/.installed  ## the ratios on 3.14 and 3.15 (Debian unstable root), added under each table of docs/benchmarks.md
	SID_ROOT=$(SID_ROOT) .ci/new-pythons --bench
	# This interpreter again, right after: the same machine load as the rows above it.
	$(BIN)/python -m benchmarks.run --ratios-only .sid/bench-here.json \
	    --label "$$($(BIN)/python -c 'import platform; print(platform.python_version())'), at the same time"
	$(BIN)/python -m benchmarks.run --add-to-doc \
	    --other .sid/bench-here.json --other .sid/bench-3.14.json --other .sid/bench-3.15.json

# Release artifacts (.ci/dist): the sdist, this interpreter's wheel repaired to a manylinux tag with
# the compiled reader in it, and the pure-Python wheel for interpreters with no binary wheel.
dist:  ## dist/: the sdist, a manylinux wheel for $(PYTHON), the pure-Python wheel; twine check
	PYTHON=$(PYTHON) .ci/dist build

check-dist: dist  ## each of dist/'s artifacts installed in a clean virtualenv: reader, quick start
	PYTHON=$(PYTHON) .ci/dist check

check-wheel:  ## one wheel for $(PYTHON), built, repaired and checked in a clean virtualenv (CI: each Python)
	PYTHON=$(PYTHON) .ci/dist wheel

clean:
	rm -rf $(VENV) .venv-* .conformance .pytest_cache .mypy_cache .ruff_cache .hypothesis docs/_build dist
