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
# PostgreSQL's binaries live in /usr/lib/postgresql/<version>/bin (not on PATH). Chromium is
# the browser the web console's tests drive through Playwright's library (pip's `playwright`,
# never `playwright install`: it would download a browser of its own). The console itself
# (console/) is plain ES modules served as they are: nothing to build.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing postgresql (Debian package)"; \
	  $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }
	@{ command -v node && command -v npm; } >/dev/null || { \
	  echo "installing nodejs and npm (Debian packages)"; \
	  $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm; }
	@[ -x /usr/bin/chromium ] || { \
	  echo "installing chromium (Debian package: the web console's browser tests)"; \
	  $(SUDO) apt-get update -q && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

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

# The Node client (clients/node) loads its protos at run time with @grpc/proto-loader; this copies
# the public API and the google.rpc error protos (from the venv's googleapis-common-protos) into
# clients/node/proto/ and generates its TypeScript types into clients/node/generated/ (neither
# committed). npm ci installs the exact versions of clients/node/package-lock.json.
NODE := clients/node
NODE_PROTOS := fmapi/inference/v1/inference.proto
$(NODE)/.stamp: $(VENV)/.tools $(addprefix protos/,$(NODE_PROTOS)) $(NODE)/package.json $(NODE)/package-lock.json
	@{ command -v node && command -v npm; } >/dev/null || { \
	  echo "node and npm are needed for clients/node: run make install (or make system-deps)"; exit 1; }
	$(BIN)/python -c 'import google.rpc' 2>/dev/null || $(PIP) googleapis-common-protos
	cd $(NODE) && npm ci --no-audit --no-fund
	rm -rf $(NODE)/proto $(NODE)/generated && mkdir -p $(NODE)/proto/google/rpc
	cd protos && cp --parents $(NODE_PROTOS) ../$(NODE)/proto/
	rpc=$$($(BIN)/python -c 'import google.rpc, os; print(os.path.dirname(google.rpc.__file__))') && \
	  cp "$$rpc/status.proto" "$$rpc/error_details.proto" $(NODE)/proto/google/rpc/
	cd $(NODE) && node_modules/.bin/proto-loader-gen-types --keepCase --longs=String --enums=String \
	  --defaults --oneofs --grpcLib=@grpc/grpc-js -I proto --outDir=generated \
	  $(NODE_PROTOS) google/rpc/status.proto google/rpc/error_details.proto
	touch $@

gen: $(GEN)/.stamp $(NODE)/.stamp ## generate Python code (gen/) and the Node client's protos and types (clients/node/), not committed

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

install: system-deps $(VENV)/.deps $(NODE)/.stamp ## create .venv with every dependency and the generated code

# The public contract (fmapi.inference.v1) never breaks by accident: buf breaking (FILE rules)
# compares the working tree with the previous commit of main (said and skipped where there is
# none, as in a shallow clone). A deliberate break is a new package version (v2), not an edit.
lint: install ## buf lint (STANDARD) on the protos, buf breaking on the public API
	$(BIN)/buf lint protos
	@if git rev-parse -q --verify HEAD~1 >/dev/null; then \
	  cd protos && ../$(BIN)/buf breaking --against '../.git#ref=HEAD~1,subdir=protos' \
	    --path fmapi/inference && echo "buf breaking: fmapi.inference.v1 is compatible with HEAD~1"; \
	else echo "buf breaking: skipped, no previous commit to compare with"; fi

run: install ## start the whole system in the foreground (Envoy on 127.0.0.1:8080; FMAPI_HTTP_PORT overrides)
	$(BIN)/fmapi dev up

# The whole suite, then the e2e tier once more on two replicas of every stateless service and
# exporting no spans, as a deployment without OTEL_EXPORTER_OTLP_ENDPOINT runs (its internal
# calls have no tracing interceptors). The fault tests, which start their own replicated system,
# and the tests of exported traces run in the first pass only.
TEST_REPLICAS := gateway=2,auth=2,routing=2,quota=2,embedding=2
TRACE_TESTS := tests/e2e/test_observability_e2e.py::test_a_streaming_chat_is_one_trace_from_envoy_to_the_engine \
  tests/e2e/test_observability_e2e.py::test_a_grpc_chat_is_one_trace_too \
  tests/e2e/test_observability_e2e.py::test_a_request_refused_by_ext_authz_has_its_trace_marked_as_an_error \
  tests/e2e/test_embeddings_e2e.py::test_one_trace_spans_gateway_quota_and_embedding_without_routing \
  tests/e2e/test_trace_sampling_e2e.py
test: install lint ## install everything and run the whole test suite (e2e also on replicas)
	$(BIN)/python -m pytest tests
	$(MAKE) --no-print-directory test-replicas

test-replicas: install ## the e2e tier on replicas only
	FMAPI_TEST_REPLICAS=$(TEST_REPLICAS) FMAPI_TEST_TRACES=off $(BIN)/python -m pytest tests/e2e \
	  --deselect tests/e2e/test_replica_faults_e2e.py $(addprefix --deselect ,$(TRACE_TESTS))

BENCH_NAMES := embeddings generation auth quota usage observability replicas profile ttft
bench: install ## run the benchmarks (prints ratios); `make bench quota` runs only that one
	$(BIN)/python -m bench $(filter $(BENCH_NAMES),$(MAKECMDGOALS))
ifneq ($(filter bench,$(MAKECMDGOALS)),)
$(BENCH_NAMES): ; @:
endif

clean: ## remove generated code and runtime files (keeps .venv)
	rm -rf $(GEN) .fmapi/run $(NODE)/proto $(NODE)/generated $(NODE)/.stamp

.PHONY: help system-deps gen install lint run test test-replicas bench clean
