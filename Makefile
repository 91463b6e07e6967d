# migtun: two commands on a fresh machine.
#   make demo   a real QEMU live migration with storage through two migtun processes
#   make test   vet, unit tests with -race, fuzz seed corpora, real-QEMU end-to-end tests on every
#               QEMU generation (MIGTUN_QEMU selects; see docs/testing.md), a brief benchmark run
#   make check  gofmt, vet and the libraries' unit tests with -race -short: a few minutes

GO       ?= go
FUZZTIME ?= 60s
BIN      := bin/migtun
VERSION  := $(shell git describe --always --dirty 2>/dev/null || echo dev)

.PHONY: all build deps demo test check vet unit bench-smoke fuzz clean image deploy-test man

all: build

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/migtun

deps:
	./scripts/deps.sh
	$(GO) mod download

# Man pages, one per command, from the commands' own flags.
man: build
	$(BIN) man --dir bin/man

demo: deps build
	$(GO) run ./internal/demo --migtun $(BIN)

test: deps vet unit bench-smoke deploy-test

# The quick loop: vet (gofmt, go vet, tidy go.mod) and everything but
# cmd/migtun (the end-to-end tests), short.
check: vet
	$(GO) test -race -short -shuffle=on -timeout 5m $$($(GO) list ./... | grep -v /cmd/)

# gofmt, go vet, and go.mod as go mod tidy would leave it (both modules).
vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...
	@$(GO) mod tidy -diff || { echo "go.mod or go.sum is not tidy: run go mod tidy"; exit 1; }
	@cd deploy && $(GO) mod tidy -diff || { echo "deploy/go.mod or go.sum is not tidy: run go mod tidy in deploy/"; exit 1; }

# Unit tests, fuzz seed corpora (Fuzz* run their seeds as tests) and the
# end-to-end tests, which build the migtun binary once per run and run real
# QEMU, every generation installed (MIGTUN_QEMU=7.2 or =10.0 selects one).
# Those that mostly wait run in parallel, up to 4 at a time.
unit:
	$(GO) test -race -shuffle=on -parallel 4 -timeout 45m ./...

# The Go benchmarks, once each and briefly, so they do not rot.
bench-smoke:
	$(GO) test -run '^$$' -bench . -benchtime 1x ./bench/ ./proxy/ ./tunnel/

# Each fuzz target for FUZZTIME.
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$f"; \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

clean:
	rm -rf bin

# The systemd unit, Kubernetes manifests and OCI image under deploy/, a Go
# module of its own so their test dependencies stay out of the main module.
deploy-test:
	./deploy/deps.sh
	cd deploy && $(GO) vet ./... && $(GO) test -race -shuffle=on -timeout 20m ./...

# The OCI image (static binary only), without a container daemon: an OCI
# layout in bin/migtun-image and an archive in bin/migtun-image.tar
# (podman load -i bin/migtun-image.tar).
image:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-X main.version=$(VERSION)" -o bin/migtun-static ./cmd/migtun
	cd deploy && $(GO) run ./cmd/migtun-image --binary ../bin/migtun-static --version $(VERSION) \
	  --created $$(git log -1 --format=%ct 2>/dev/null || echo 0) --layout ../bin/migtun-image --archive ../bin/migtun-image.tar
