# wspush — `make run` starts the server, `make test` runs every check.

CARGO ?= cargo
NODE  ?= node
NPM   ?= npm
PORT  ?= 3210
QUEUE ?= list
ARGS  ?=

TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: run build test check fmt clippy unit browser-test loadtest-ab clean

run:
	$(CARGO) run --release -- -port=$(PORT) -queue=$(QUEUE) $(ARGS)

build:
	$(CARGO) build --release

# Every test: formatting, lints as errors, unit and integration tests, the browser test.
test: fmt clippy unit browser-test

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

unit:
	$(CARGO) test --all-targets

# The demo page in headless Chromium (/usr/bin/chromium, or CHROMIUM=path) against
# the debug binary; the screenshot lands in $(TARGET_DIR)/browser-artifacts/.
BROWSER_DEPS := tests/browser/node_modules/.package-lock.json

browser-test: $(BROWSER_DEPS)
	$(CARGO) build
	WSPUSH_BIN=$(TARGET_DIR)/debug/wspush WSPUSH_ARTIFACTS=$(TARGET_DIR)/browser-artifacts \
		$(NODE) --test tests/browser/

$(BROWSER_DEPS): tests/browser/package.json tests/browser/package-lock.json
	$(NPM) ci --prefix tests/browser --no-audit --no-fund
	@touch $@

# The seed's ApacheBench run against a server started with `make run`.
loadtest-ab:
	ab -c 100 -n 100000 -T 'application/json' -p loadtest/postdata.txt http://127.0.0.1:$(PORT)/send

clean:
	$(CARGO) clean
