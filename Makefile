# `make demo` and `make test` are all a new machine needs: each creates the virtualenv first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-transparent test test-netns lint unit bench bench-transparent bench-deps profile test-compose clean

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
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/ruff format --check sidecar tests bench
	$(VENV)/bin/mypy sidecar

test: lint
	$(PY) -m pytest -m "not netns"

# Transparent mode in network namespaces (root; iptables, iproute2, tcpdump): skipped with the
# reason where namespaces cannot be made.
test-netns: venv
	$(PY) -m pytest -m netns tests/netns

unit: venv
	$(PY) -m pytest tests/unit

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

test-compose: venv
	bash scripts/compose-test.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
