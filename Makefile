# fastattn verbs. Quick start: `make bench` (installs, builds, benchmarks the device present) and
# `make test` (the test suite; on a machine without a GPU the Triton kernels run in the interpreter).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
# Test workers: the interpreter is CPU-bound, one worker per core.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, os.cpu_count() or 1)))")
NVCC ?= nvcc
CUDA_ARCHS ?= 70 80 90

.PHONY: deps build test test-gpu lint check-cuda bench gpu-report train clean

# Installs only what is missing, so it also runs on a machine with no network but everything there.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@$(PYTHON) .ci/ensure_deps.py

build: deps
	$(PIP) install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
	@$(PYTHON) -c "import fastattn, json; print('fastattn backends:', json.dumps(fastattn.backends(), indent=1))"

test: build
	$(PYTHON) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup -q

test-gpu: build
	$(PYTHON) -m pytest tests -m gpu -q

lint:
	@$(PYTHON) -c "import ruff" 2>/dev/null || $(PIP) install ruff
	$(PYTHON) -m ruff check .

# Compile every CUDA source for sm_70, sm_80 and sm_90 without torch (the kernels use raw pointers).
check-cuda:
	@for f in csrc/cuda/*.cu; do \
	  for a in $(CUDA_ARCHS); do \
	    echo "nvcc sm_$$a $$f"; \
	    $(NVCC) -std=c++17 -O2 -arch=sm_$$a --expt-relaxed-constexpr -Icsrc -c $$f -o /dev/null || exit 1; \
	  done; \
	done

bench: build
	$(PYTHON) -m benchmarks.run $(BENCH_ARGS)

gpu-report: build
	$(PYTHON) -m pytest tests -m gpu -q 2>&1 | tee benchmarks/results/gpu-tests.log
	$(PYTHON) -m benchmarks.run

train: build
	$(PYTHON) -m fastattn.train --preset tiny

clean:
	rm -rf build *.egg-info fastattn/*.so .pytest_cache
