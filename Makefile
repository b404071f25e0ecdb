# `make demo` and `make test` are all a new machine needs: each creates the virtualenv first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint unit bench bench-deps profile test-compose compile uncompile test-compiled clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/sidecar demo

lint: venv
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/ruff format --check sidecar tests bench
	$(VENV)/bin/mypy sidecar

test: lint
	$(PY) -m pytest

unit: venv
	$(PY) -m pytest tests/unit

bench-deps:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk iperf3 stunnel4 haproxy nginx libnginx-mod-stream

bench: venv
	$(PY) -m bench

profile: venv
	$(PY) -m bench --profile

# The hot path compiled to C with mypyc (needs a C compiler and Python's headers); pure Python is
# what runs without it. `make uncompile` goes back to pure Python.
# identity.py stays Python: its frozen dataclasses travel to workers by pickle, which a compiled
# frozen class refuses (and it runs once per connection, not per event).
COMPILED := sidecar/relay.py sidecar/legs.py sidecar/tlsio.py

compile: venv
	$(VENV)/bin/mypyc $(COMPILED)
	rm -rf build

uncompile:
	rm -f sidecar/*.so *__mypyc*.so
	rm -rf build .mypyc

# The tests of the compiled modules, run against the compiled build.
test-compiled: compile
	$(PY) -c "import sidecar.relay as m; assert m.__file__.endswith('.so'), m.__file__"
	$(PY) -m pytest -p no:cacheprovider tests/unit/test_relay.py tests/integration/test_legs.py \
		tests/integration/test_integrity.py tests/integration/test_limits.py tests/integration/test_workers.py; \
		status=$$?; $(MAKE) uncompile; exit $$status

test-compose: venv
	bash scripts/compose-test.sh

clean: uncompile
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
