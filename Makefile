# fmapi — every install step lives here, so a fresh machine needs only `make run` / `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRA ?= cpu
CONSTRAINTS := requirements/constraints.txt
PROTOS := $(shell find protos -name '*.proto')
GEN := gen/python
PIP := $(BIN)/pip install --disable-pip-version-check -q -c $(CONSTRAINTS)

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

# redis-server and PostgreSQL are the system packages: Debian's, installed when missing.
# PostgreSQL's binaries live in /usr/lib/postgresql/<version>/bin (not on PATH).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing postgresql (Debian package)"; \
	  $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -U pip wheel

$(VENV)/.tools: $(BIN)/python $(CONSTRAINTS)
	$(PIP) grpcio-tools buf-bin
	touch $@

$(GEN)/.stamp: $(VENV)/.tools $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=$(GEN) --grpc_python_out=$(GEN) --pyi_out=$(GEN) $(PROTOS)
	find $(GEN)/fmapi -type d -exec touch {}/__init__.py \;
	touch $@

gen: $(GEN)/.stamp ## generate Python code from protos/ (into gen/, not committed)

# torch first, pinned, so nothing pulls a multi-GB CUDA build; PyPI's torchvision/torchaudio/
# torchcodec break `import transformers` beside the CPU torch, and vLLM's text models need none.
$(VENV)/.deps: $(VENV)/.tools $(GEN)/.stamp pyproject.toml $(CONSTRAINTS)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[$(EXTRA),dev]'
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	# xds-protos ships an old copy of OpenTelemetry's protos over opentelemetry-proto's: put the
	# real ones back, or the OTLP exporter fails to import.
	$(PIP) --force-reinstall --no-deps opentelemetry-proto
	touch $@

install: system-deps $(VENV)/.deps ## create .venv with every dependency and the generated code

lint: install ## buf lint (STANDARD) on the protos
	$(BIN)/buf lint protos

run: install ## start the whole system in the foreground (Envoy on 127.0.0.1:8080; FMAPI_HTTP_PORT overrides)
	$(BIN)/fmapi dev up

test: install lint ## install everything and run the whole test suite
	$(BIN)/python -m pytest tests

BENCH_NAMES := embeddings generation auth quota usage
bench: install ## run the benchmarks (prints ratios); `make bench quota` runs only that one
	$(BIN)/python -m bench $(filter $(BENCH_NAMES),$(MAKECMDGOALS))
ifneq ($(filter bench,$(MAKECMDGOALS)),)
$(BENCH_NAMES): ; @:
endif

clean: ## remove generated code and runtime files (keeps .venv)
	rm -rf $(GEN) .fmapi/run

.PHONY: help system-deps gen install lint run test bench clean
