# `make demo` and `make test` are all a new machine needs: each creates the virtualenv first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-transparent test test-netns lint unit fuzz fuzz-smoke bench bench-transparent bench-deps profile soak test-compose compile uncompile test-compiled clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: venv
	$(VENV)/bin/sidecar demo

# The same story in transparent mode, in network namespaces, with tcpdump's capture as proof (root).
demo-transparent: venv
	$(PY) scripts/demo_transparent.py

lint: venv
	$(VENV)/bin/ruff check sidecar tests bench fuzz
	$(VENV)/bin/ruff format --check sidecar tests bench fuzz
	$(VENV)/bin/mypy sidecar

test: lint
	$(PY) -m pytest -m "not netns"

# Transparent mode in network namespaces (root; iptables, iproute2, tcpdump): skipped with the
# reason where namespaces cannot be made.
test-netns: venv
	$(PY) -m pytest -m netns tests/netns

unit: venv
	$(PY) -m pytest tests/unit

# Fuzzing (atheris): each target for FUZZ_SECONDS; a crash stops the run, lands in fuzz/crashes/
# and becomes a case in tests/unit/fuzz_cases/. fuzz-smoke is the short pass CI runs.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := config patterns spiffe pin proxy http1

fuzz: venv
	@for t in $(FUZZ_TARGETS); do \
		echo "fuzz: $$t for $(FUZZ_SECONDS)s"; \
		$(PY) -m fuzz $$t --seconds $(FUZZ_SECONDS) 2>fuzz/$$t.log || { tail -40 fuzz/$$t.log; exit 1; }; \
		grep -h "stat::number_of_executed_units" fuzz/$$t.log; \
	done

fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECONDS=10

bench-deps:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk iperf3 stunnel4 haproxy nginx libnginx-mod-stream

bench: venv
	$(PY) -m bench

# The bench's sidecar pair in explicit and in transparent (capture) mode, same run, inside a network
# namespace of its own (root): bench/README.md, "What transparent mode costs".
bench-transparent: venv
	bash scripts/bench-transparent.sh

profile: venv
	$(PY) -m bench --profile

# A soak through our sidecar pair: churn, keep-alive, bulk, idle and a certificate rotation every
# minute; fails on any failed connection or unbounded growth (bench/soakreport.py).
SOAK_MINUTES ?= 30
SOAK_OUT ?= bench/results

soak: venv
	$(PY) -m bench soak --minutes $(SOAK_MINUTES) --out $(SOAK_OUT)

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
		tests/integration/test_integrity.py tests/integration/test_limits.py tests/integration/test_workers.py \
		tests/integration/test_tunnels.py tests/integration/test_identity_forwarding.py \
		tests/integration/test_rewriting_leg.py tests/integration/test_transparent.py; \
		status=$$?; $(MAKE) uncompile; exit $$status

test-compose: venv
	bash scripts/compose-test.sh

clean: uncompile
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
