# fastattn verbs. Quick start: `make bench` (installs, builds, benchmarks the device present) and
# `make test` (the test suite; on a machine without a GPU the Triton kernels run in the interpreter).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
# Test workers: the interpreter is CPU-bound, one worker per core.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, os.cpu_count() or 1)))")
NVCC ?= nvcc
CHECK_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# sm_70 while this nvcc still builds it (CUDA 13 dropped Volta: then sm_75, the oldest it has).
CUDA_ARCHS ?= $(shell $(NVCC) --list-gpu-arch 2>/dev/null | grep -q compute_70 && echo 70 80 90 || echo 75 80 90)
# The half/bfloat16 macros torch's CUDAExtension builds with, so the check sees what the build sees.
CUDA_CHECK_FLAGS ?= -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__

.PHONY: deps build test test-cuda-emulated test-gpu lint check-cuda check-sass bench gpu-check gpu-report train clean

# Installs only what is missing, so it also runs on a machine with no network but everything there.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@$(PYTHON) .ci/ensure_deps.py

build: deps
	$(PIP) install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
	@$(PYTHON) -c "import fastattn, json; print('fastattn backends:', json.dumps(fastattn.backends(), indent=1))"

test: build
	$(PYTHON) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup -q

# The CUDA kernels and their glue compiled as C++ and run on the CPU emulator against the oracle
# (csrc/cuda/tools/emulate; ~1.5 min to build once into build/cuda_emu, ~1-2 min to run on 2 cores).
test-cuda-emulated: deps
	$(PYTHON) -m pytest csrc/cuda/tools/emulate/test_emulated.py -q -n 0

test-gpu: build
	$(PYTHON) -m pytest tests -m gpu -q

lint:
	@$(PYTHON) -c "import ruff" 2>/dev/null || $(PIP) install ruff
	$(PYTHON) -m ruff check .

# Compile every CUDA source for each of CUDA_ARCHS without torch (the kernels use raw pointers),
# then syntax-check the torch glue and match its signatures to the op schemas (no CUDA torch needed).
# One nvcc per (file, arch), as many at once as there are cores; any failure fails the target.
check-cuda:
	@for f in csrc/cuda/*.cu; do for a in $(CUDA_ARCHS); do echo "$$a $$f"; done; done | \
	  xargs -P $(CHECK_JOBS) -L 1 sh -c 'echo "nvcc sm_$$0 $$1" && \
	    $(NVCC) -std=c++17 -O2 -arch=sm_$$0 --expt-relaxed-constexpr $(CUDA_CHECK_FLAGS) -Icsrc -c $$1 -o /dev/null'
	PYTHON=$(PYTHON) csrc/cuda/tools/check_glue.sh

# Compile every Triton autotune candidate for sm_90a and sm_80 (no GPU) and read ptxas/SASS, and every
# CUDA kernel of csrc/cuda with nvcc -Xptxas -v: fails on serialized wgmma, spills, shared memory over
# the limit; tables in benchmarks/results/static/. SASS_ARGS=--quick: bf16 only, attention head dims
# 64 and 128 (the CUDA kernels in full); SASS_ARGS="--only cuda --merge": the CUDA rows alone.
SASS_ARGS ?=
check-sass: deps
	$(PYTHON) -m benchmarks.check_sass --jobs $(CHECK_JOBS) $(SASS_ARGS)

# Then the host overhead per call of every public function and module against torch's op (tiny
# inputs, one thread; issue 17's target is +25 us) with its README table, and the CPU kernels' speed
# ratio to torch's ops (issue 18).
bench: build
	$(PYTHON) -m benchmarks.run $(BENCH_ARGS)
	$(PYTHON) -m benchmarks.bench_overhead
	$(PYTHON) -m benchmarks.bench_overhead --readme
	$(PYTHON) -m benchmarks.bench_cpu_ratio $(if $(findstring --quick,$(BENCH_ARGS)),--quick)

# The prepared check for a lent GPU: one call (timeout 570 s), everything that matters in OUT (at most
# 8 files): environment and ceilings, build, GPU tests, compute-sanitizer, key benchmarks, summary.md.
# Its own log is OUT/gpu_check.log, so `make gpu-check OUT=$OUT | tee $OUT/log.txt` keeps both.
OUT ?= gpu-check-out
BUDGET ?= 480
GPU_CHECK_ARGS ?=
gpu-check:
	mkdir -p $(OUT) && PYTHONUNBUFFERED=1 $(PYTHON) -m benchmarks.gpu_check --out $(OUT) --budget-s $(BUDGET) $(GPU_CHECK_ARGS)

gpu-report: build
	$(PYTHON) -m pytest tests -m gpu -q 2>&1 | tee benchmarks/results/gpu-tests.log
	$(PYTHON) -m benchmarks.run

# Train the reference Transformer on the stdlib's source and print a sample, e.g.
# `make train PRESET=small STEPS=2000 TRAIN_ARGS="--attn naive"` (python -m fastattn.train --help).
PRESET ?= tiny
STEPS ?= 500
TRAIN_OUT ?= runs/$(PRESET)
TRAIN_ARGS ?=
train: build
	$(PYTHON) -m fastattn.train --preset $(PRESET) --steps $(STEPS) --out $(TRAIN_OUT) --overwrite $(TRAIN_ARGS)
	-$(PYTHON) -m fastattn.generate --checkpoint $(TRAIN_OUT)/checkpoint.pt --prompt "def " --max-new-tokens 200

clean:
	rm -rf build *.egg-info fastattn/*.so .pytest_cache
