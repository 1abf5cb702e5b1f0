# wspush — `make run` starts the server, `make test` runs every check.

CARGO ?= cargo
NODE  ?= node
NPM   ?= npm
PORT  ?= 3210
QUEUE ?= list
ARGS  ?=

TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
KOSOKU := $(TARGET_DIR)/kosoku-venv

.PHONY: run build test check fmt clippy unit netns-cluster autobahn browser-test fuzz loadtest-ab clean \
	bench bench-quick bench-smoke bench-deps bench-debian bench-build \
	release release-linux release-windows release-darwin release-freebsd

run:
	$(CARGO) run --release -- -port=$(PORT) -queue=$(QUEUE) $(ARGS)

build:
	$(CARGO) build --release

# Every test: formatting, lints as errors, unit and integration tests, the Autobahn
# WebSocket conformance cases, the browser test, and a short run of the load-test kit
# that must lose nothing (the figures themselves come from `make bench`).
test: fmt clippy unit autobahn browser-test bench-smoke

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

# The Disque tests are ignored by default (no package ships a Disque server) and
# run here when one is named by DISQUE_SERVER or found on PATH. tests/netns.rs needs
# root, iproute2 and nftables; it runs where a throwaway network namespace can be
# made, and stays listed as ignored elsewhere.
unit:
	$(CARGO) test --all-targets
	@if [ -n "$${DISQUE_SERVER:-}" ] || command -v disque-server >/dev/null; then \
		echo "$(CARGO) test --test disque -- --include-ignored"; \
		$(CARGO) test --test disque -- --include-ignored; \
	else \
		echo "SKIPPED: tests/disque.rs (no disque-server): its tests stay ignored"; \
	fi
	@if command -v nft >/dev/null && ip netns add wspush-probe-$$$$ 2>/dev/null; then \
		ip netns del wspush-probe-$$$$; \
		echo "$(CARGO) test --test netns -- --include-ignored"; \
		$(CARGO) test --test netns -- --include-ignored; \
	else \
		echo "SKIPPED: tests/netns.rs (needs root, ip netns and nft): its tests stay ignored"; \
	fi

# The Redis Cluster host-failure test alone, with its output (the measured: line).
netns-cluster:
	$(CARGO) test --test netns -- --include-ignored --exact a_redis_cluster_primary_host_going_away_loses_no_200 --nocapture

# Autobahn|Testsuite cases 1-10, 12 and 13 (driven by kosoku from PyPI) against
# `wspush -echo -deflate=on`, compared case by case with tests/autobahn/expected-results.json.
autobahn:
	$(CARGO) build
	test -x $(KOSOKU)/bin/kosoku || { python3 -m venv $(KOSOKU) && $(KOSOKU)/bin/pip install -q kosoku==0.1.0; }
	$(KOSOKU)/bin/python tests/autobahn/run.py --bin $(TARGET_DIR)/debug/wspush

# The demo page in headless Chromium (/usr/bin/chromium, or CHROMIUM=path) against
# the debug binary; the screenshot lands in $(TARGET_DIR)/browser-artifacts/.
BROWSER_DEPS := tests/browser/node_modules/.package-lock.json

browser-test: $(BROWSER_DEPS)
	$(CARGO) build
	WSPUSH_BIN=$(TARGET_DIR)/debug/wspush WSPUSH_ARTIFACTS=$(TARGET_DIR)/browser-artifacts \
		$(NODE) --test tests/browser/*.test.js

$(BROWSER_DEPS): tests/browser/package.json tests/browser/package-lock.json
	$(NPM) ci --prefix tests/browser --no-audit --no-fund
	@touch $@

# Fuzzing (not part of `make test`): each cargo-fuzz target in fuzz/ runs for
# FUZZ_SECONDS on the nightly toolchain, starting from the seeds in fuzz/corpus/TARGET/.
# What libFuzzer learns goes to fuzz/target/corpus/TARGET/, crashes to fuzz/artifacts/.
# `make fuzz FUZZ_TARGETS=ws_frames FUZZ_SECONDS=600` runs one target for ten minutes.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= http_request ws_frames send_body
CARGO_NIGHTLY ?= cargo +nightly

fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/target/corpus/$$t; \
		echo "fuzz: $$t for $(FUZZ_SECONDS)s"; \
		$(CARGO_NIGHTLY) fuzz run $$t fuzz/target/corpus/$$t fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1; \
	done

# Releases: dist/wspush-VERSION-OS-ARCH.tar.gz (.zip for Windows) with the binary,
# README.md and deploy/, and the bare binary as dist/wspush-OS-ARCH (what
# deploy/Dockerfile copies). `make release` tries every OS, goes on past those it cannot
# build here and says which were built. A target needs its Rust standard library
# (`rustup target add TRIPLE`) and, when cross-compiling, a linker for it.
RUSTC   ?= rustc
DIST    ?= dist
ARCH    ?= x86_64
VERSION := $(shell awk -F'"' '/^version *=/ { print $$2; exit }' Cargo.toml)
RELEASE_OSES := linux windows darwin freebsd

have_std = $(wildcard $(shell $(RUSTC) --print sysroot)/lib/rustlib/$(1)/lib)

# Linux: musl when its standard library is installed, else glibc linked statically.
LINUX_TARGET   ?= $(if $(call have_std,$(ARCH)-unknown-linux-musl),$(ARCH)-unknown-linux-musl,$(ARCH)-unknown-linux-gnu)
WINDOWS_TARGET ?= $(ARCH)-pc-windows-gnu
DARWIN_TARGET  ?= $(ARCH)-apple-darwin
FREEBSD_TARGET ?= $(ARCH)-unknown-freebsd

WINDOWS_LINKER_HINT := on Debian, apt-get install gcc-mingw-w64-x86-64 (x86_64-w64-mingw32-gcc); or build on Windows with WINDOWS_TARGET=x86_64-pc-windows-msvc
DARWIN_LINKER_HINT  := build on macOS (Xcode command line tools), or set CARGO_TARGET_<TRIPLE>_LINKER to an osxcross clang; Apple silicon: DARWIN_TARGET=aarch64-apple-darwin
FREEBSD_LINKER_HINT := build on FreeBSD, or set CARGO_TARGET_<TRIPLE>_LINKER to a clang with a FreeBSD sysroot

# $(call release_for,OS,TARGET,ARCHIVE,LINKER-HINT,RUSTFLAGS)
define release_for
	@if [ -z "$(call have_std,$(2))" ]; then \
		echo "release-$(1): the Rust standard library for $(2) is not installed." >&2; \
		echo "  add it with: rustup target add $(2)" >&2; \
		echo "  and give cargo a linker for it: $(4)" >&2; \
		exit 1; \
	fi
	RUSTFLAGS="$(strip $(RUSTFLAGS) $(5))" $(CARGO) build --release --locked --target $(2) || { \
		echo "release-$(1): building for $(2) failed; a cross build needs a linker: $(4)" >&2; exit 1; }
	@set -e; \
	name=wspush-$(VERSION)-$(1)-$(firstword $(subst -, ,$(2))); \
	bin=$(TARGET_DIR)/$(2)/release/wspush$(if $(findstring windows,$(2)),.exe); \
	stage=$(DIST)/$$name; \
	rm -rf "$$stage" "$$stage.$(3)"; mkdir -p "$$stage"; \
	cp "$$bin" README.md "$$stage/"; cp -R deploy "$$stage/"; \
	if [ "$(3)" = zip ]; then \
		if command -v zip >/dev/null; then (cd $(DIST) && zip -qr "$$name.zip" "$$name"); \
		else (cd $(DIST) && python3 -m zipfile -c "$$name.zip" "$$name"); fi; \
	else \
		tar -C $(DIST) -czf "$$stage.tar.gz" "$$name"; \
	fi; \
	rm -rf "$$stage"; \
	cp "$$bin" "$(DIST)/wspush-$(1)-$(firstword $(subst -, ,$(2)))$(if $(findstring windows,$(2)),.exe)"; \
	echo "release-$(1): $$stage.$(3) ($$(wc -c <"$$bin") byte binary)"
endef

release:
	@built=; failed=; \
	for os in $(RELEASE_OSES); do \
		if $(MAKE) --no-print-directory release-$$os; then built="$$built $$os"; \
		else failed="$$failed $$os"; fi; \
	done; \
	echo "release $(VERSION): built:$${built:- none}; not built:$${failed:- none}"; \
	[ -n "$$built" ]

release-linux:
	$(call release_for,linux,$(LINUX_TARGET),tar.gz,gcc and the static glibc of libc6-dev,-C target-feature=+crt-static)
	@bin=$(TARGET_DIR)/$(LINUX_TARGET)/release/wspush; \
	if command -v ldd >/dev/null && ldd "$$bin" 2>&1 | grep -q '=>'; then \
		echo "release-linux: $$bin is not static:" >&2; ldd "$$bin" >&2; exit 1; \
	fi

release-windows:
	$(call release_for,windows,$(WINDOWS_TARGET),zip,$(WINDOWS_LINKER_HINT))

release-darwin:
	$(call release_for,darwin,$(DARWIN_TARGET),tar.gz,$(DARWIN_LINKER_HINT))

release-freebsd:
	$(call release_for,freebsd,$(FREEBSD_TARGET),tar.gz,$(FREEBSD_LINKER_HINT))

# The seed's ApacheBench run against a server started with `make run`.
loadtest-ab:
	loadtest/ab.sh http://127.0.0.1:$(PORT)/send 100 100000

# Benchmarks, not tests: wspush against nginx + nchan and uWebSockets.js doing the
# same job on this machine, with nginx `return 200` as the HTTP ceiling (loadtest/,
# BENCHMARKS.md). Installs nginx, nchan, ab, wrk and the uWebSockets.js peer's npm
# package when missing, builds the release server and the load generator, runs every
# workload against each, prints the table, writes loadtest/results/{latest.json,
# latency.svg} and refreshes BENCHMARKS.md. About ten minutes; `make bench-quick`
# checks the whole kit in about two. BENCH_ARGS passes flags to loadtest/bench.py
# (--help lists them).
BENCH_ARGS ?=

bench: bench-deps bench-build
	python3 loadtest/bench.py --target-dir $(TARGET_DIR) $(BENCH_ARGS)

bench-quick: bench-deps bench-build
	python3 loadtest/bench.py --target-dir $(TARGET_DIR) --quick --no-update --out $(TARGET_DIR)/bench-quick.json $(BENCH_ARGS)

bench-build:
	$(CARGO) build --release
	$(CARGO) build --release --manifest-path loadtest/Cargo.toml --target-dir loadtest/target

# The kit's check for `make test`: builds the load generator, then ~2 s of fan-out
# and unicast against the debug server that fails on any lost, duplicated or
# misrouted message. Needs no peer, no package and no network.
bench-smoke:
	$(CARGO) build
	$(CARGO) build --release --manifest-path loadtest/Cargo.toml --target-dir loadtest/target
	python3 loadtest/bench.py --smoke --binary $(TARGET_DIR)/debug/wspush

# Debian packages, then the uWebSockets.js peer's npm package (binaries inside,
# no install scripts); webbench is not packaged (loadtest/webbench.sh runs it if present).
UWS_DEPS := loadtest/peers/node_modules/.package-lock.json

bench-deps: bench-debian $(UWS_DEPS)

$(UWS_DEPS): loadtest/peers/package.json loadtest/peers/package-lock.json
	$(NPM) ci --prefix loadtest/peers --ignore-scripts --no-audit --no-fund
	@touch $@

bench-debian:
	@missing=; \
	{ command -v nginx || test -x /usr/sbin/nginx; } >/dev/null || missing="$$missing nginx"; \
	test -f /usr/lib/nginx/modules/ngx_nchan_module.so || missing="$$missing libnginx-mod-nchan"; \
	command -v ab >/dev/null || missing="$$missing apache2-utils"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v python3 >/dev/null || missing="$$missing python3"; \
	command -v $(NODE) >/dev/null || missing="$$missing nodejs"; \
	command -v $(NPM) >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
		sudo=; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		echo "bench: installing$$missing"; \
		$$sudo apt-get update -q && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

clean:
	$(CARGO) clean
	rm -rf $(DIST)
