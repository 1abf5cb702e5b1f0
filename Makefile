# wspush — `make run` starts the server, `make test` runs every check.

CARGO ?= cargo
PORT  ?= 3210
QUEUE ?= list
ARGS  ?=

.PHONY: run build test check fmt clippy unit loadtest-ab clean

run:
	$(CARGO) run --release -- -port=$(PORT) -queue=$(QUEUE) $(ARGS)

build:
	$(CARGO) build --release

# Every test: formatting, lints as errors, unit and integration tests.
test: fmt clippy unit

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

unit:
	$(CARGO) test --all-targets

# The seed's ApacheBench run against a server started with `make run`.
loadtest-ab:
	ab -c 100 -n 100000 -T 'application/json' -p loadtest/postdata.txt http://127.0.0.1:$(PORT)/send

clean:
	$(CARGO) clean
