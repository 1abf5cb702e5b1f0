# wspush — `make run` starts the server, `make test` runs every check.

CARGO ?= cargo
PORT  ?= 3210
QUEUE ?= list
ARGS  ?=

KOSOKU := target/kosoku-venv

.PHONY: run build test check fmt clippy unit autobahn loadtest-ab clean

run:
	$(CARGO) run --release -- -port=$(PORT) -queue=$(QUEUE) $(ARGS)

build:
	$(CARGO) build --release

# Every test: formatting, lints as errors, unit and integration tests, and the
# Autobahn WebSocket conformance cases.
test: fmt clippy unit autobahn

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

unit:
	$(CARGO) test --all-targets

# Autobahn|Testsuite cases 1-10 (driven by kosoku from PyPI) against `wspush -echo`,
# compared case by case with tests/autobahn/expected-results.json.
autobahn:
	$(CARGO) build
	test -x $(KOSOKU)/bin/kosoku || { python3 -m venv $(KOSOKU) && $(KOSOKU)/bin/pip install -q kosoku==0.1.0; }
	$(KOSOKU)/bin/python tests/autobahn/run.py --bin target/debug/wspush


# The seed's ApacheBench run against a server started with `make run`.
loadtest-ab:
	ab -c 100 -n 100000 -T 'application/json' -p loadtest/postdata.txt http://127.0.0.1:$(PORT)/send

clean:
	$(CARGO) clean
