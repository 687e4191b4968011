"""The shared harness: contexts, work counting, timing, peak memory, the result stamp.

Every family script (bench_*.py) describes its cases and providers and builds a ``Workload`` per
(provider, case); this module turns a workload into a measurement the same way for all of them:

- time: warm-up, then repeated runs: the median of ``triton.testing.do_bench`` (CUDA events, L2
  flushed between runs) on a GPU; on the CPU the smallest of several round medians of ~1 ms samples
  (``cpu_time``), on one thread whenever other processes compete for the cores; the
  timed callable cycles through several copies of its inputs whenever one copy would fit in the
  last-level cache, so repeated runs do not find their inputs already cached;
- peak memory: the memory a run needs above its inputs. On a GPU ``torch.cuda.max_memory_allocated``
  minus what was allocated before the run; on the CPU the peak RSS (VmHWM, reset through
  /proc/self/clear_refs) of a subprocess running the case, minus that subprocess's RSS just before;
- work: FLOPs as flash-attention counts them (attention forward 4·B·H·Nq·Nk·D, halved when causal,
  backward 2.5× forward), bytes as read + write of the op's tensors for softmax and norms.

Modes: ``fwd`` is the inference forward (no autograd graph), ``bwd`` the backward alone (the
forward's graph is kept and replayed with retain_graph), ``fwd_bwd`` both, ``step`` a training
step (forward, backward, optimizer) for the end-to-end benchmark.

Run as ``python -m benchmarks.common --memory`` it is the CPU memory subprocess (spec on stdin).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"
SCHEMA_VERSION = 1

MODES = ("fwd", "bwd", "fwd_bwd", "step")
MODE_LABELS = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward+backward", "step": "training step"}
MEMORY_MODES = ("fwd", "fwd_bwd", "step")  # backward alone has no peak of its own worth reporting

# metric key -> (unit label, divisor applied to work per second)
METRICS = {
    "tflops": ("TFLOP/s", 1e12),
    "gbps": ("GB/s", 1e9),
    "tokens": ("tokens/s", 1.0),
}

# Per size preset: (CPU min_run_time s, GPU warmup ms, GPU rep ms, per-call limit s before larger sizes
# of the same provider are skipped).
TIMING = {
    "full": (0.25, 25, 100, 4.0),
    "quick": (0.1, 10, 40, 2.0),
    "tiny": (0.01, 2, 5, 2.0),
}


# ------------------------------------------------------------------------------------------------
# context and cases
# ------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What a run measures on: device type, size preset (full, quick, tiny) and dtype."""

    device: str = "cpu"
    size: str = "full"
    dtype: str = "float32"
    threads: int | None = None  # CPU threads for torch; None: torch's default (all cores)

    def apply(self) -> None:
        """Set torch's CPU thread count (in this process, and in the memory subprocess)."""
        if self.threads:
            torch.set_num_threads(self.threads)

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def pick(self, *, cpu: Any, gpu: Any, quick_cpu: Any = None, quick_gpu: Any = None, tiny: Any = None) -> Any:
        """The value for this device and size preset; tiny falls back to quick, quick to full."""
        if self.size == "tiny" and tiny is not None:
            return tiny
        if self.size in ("quick", "tiny"):
            quick = quick_gpu if self.gpu else quick_cpu
            if quick is not None:
                return quick
        return gpu if self.gpu else cpu


def default_context(
    device: str | None = None, size: str = "full", dtype: str | None = None, threads: int | None = None
) -> Context:
    """CUDA with bfloat16 when a GPU is present, else the CPU with float32. The tiny preset (tests)
    runs on one thread: on a shared, busy CPU, OpenMP's barriers make multi-threaded timings of
    tiny ops swing by 1000x, and a test only needs the machinery to work."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    if threads is None and size == "tiny":
        threads = 1
    return Context(device=device, size=size, dtype=dtype, threads=threads)


@dataclass
class Case:
    """One point of a benchmark: ``series`` groups points into a line (a plot, a table), ``x`` is
    its position on the x axis, ``params`` all the builder needs, ``work`` the counted FLOPs, bytes
    or tokens per mode."""

    series: str
    x: int
    params: dict
    work: dict[str, float] = field(default_factory=dict)


@dataclass
class Workload:
    """How to run one provider on one case.

    make_inputs: fresh inputs (a dict of tensors, modules, optimizers); called once per rotated copy.
    forward: runs the op on those inputs, returns the output to differentiate (or a scalar loss).
    step: a full training step on the inputs (mode ``step`` only).
    """

    make_inputs: Callable[[], dict]
    forward: Callable[[dict], Any] | None = None
    step: Callable[[dict], None] | None = None
    max_copies: int = 8  # 1 for models: their weights are hot in cache in real use too


# ------------------------------------------------------------------------------------------------
# work counting
# ------------------------------------------------------------------------------------------------

_BACKWARD_FLOP_FACTOR = 2.5  # flash-attention's convention: the backward does 2.5× the forward's matmuls


def attention_flops(batch, heads, n_q, n_k, head_dim, head_dim_v=None, causal=False, mode="fwd") -> float:
    """Matmul FLOPs of attention: Q·Kᵀ and P·V, 2·B·H·Nq·Nk·(D + Dv), i.e. 4·B·H·Nq·Nk·D when Dv = D;
    halved when causal (flash-attention's count), 2.5× for the backward, 3.5× for both."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    forward = 2.0 * batch * heads * n_q * n_k * (head_dim + head_dim_v)
    if causal:
        forward /= 2
    return forward * {"fwd": 1.0, "bwd": _BACKWARD_FLOP_FACTOR, "fwd_bwd": 1.0 + _BACKWARD_FLOP_FACTOR}[mode]


def softmax_bytes(rows, cols, element_size, mode="fwd") -> float:
    """Bytes a row softmax must move: forward reads x and writes y; backward reads y and dy and
    writes dx."""
    tensor = float(rows) * cols * element_size
    return tensor * {"fwd": 2, "bwd": 3, "fwd_bwd": 5}[mode]


def norm_bytes(rows, cols, element_size, mode="fwd", has_bias=True) -> float:
    """Bytes a layer/RMS norm must move: forward reads x, weight (and bias) and writes y; backward
    reads x, dy and weight and writes dx, dweight (and dbias). Per-row statistics are ignored."""
    tensor = float(rows) * cols * element_size
    params = float(cols) * element_size * (2 if has_bias else 1)
    forward = 2 * tensor + params
    backward = 3 * tensor + params + float(cols) * element_size
    return {"fwd": forward, "bwd": backward, "fwd_bwd": forward + backward}[mode]


def ffn_flops(tokens, d_model, hidden, d_out=None, gated=False, mode="fwd") -> float:
    """GEMM FLOPs of act(x·W1ᵀ)·W2ᵀ: 2·M·K·H1 + 2·M·H·Dout, H1 = 2·H for gated activations (gate and
    up); the backward computes dX and dW of both GEMMs, 2× the forward."""
    d_out = d_model if d_out is None else d_out
    first = 2.0 * tokens * d_model * hidden * (2 if gated else 1)
    forward = first + 2.0 * tokens * hidden * d_out
    return forward * {"fwd": 1.0, "bwd": 2.0, "fwd_bwd": 3.0}[mode]


def metric_value(metric: str, work: float | None, time_ms: float | None) -> float | None:
    """Work per second in the metric's unit (TFLOP/s, GB/s, tokens/s)."""
    if not work or not time_ms:
        return None
    return work / (time_ms * 1e-3) / METRICS[metric][1]


# ------------------------------------------------------------------------------------------------
# providers
# ------------------------------------------------------------------------------------------------

def _kernel_backends() -> tuple[str, ...]:
    from fastattn.dispatch import BACKENDS  # the registry's names (importing it loads no backend)

    return tuple(name for name in BACKENDS if name != "reference")  # the reference is the "naive" provider


FASTATTN_BACKENDS = _kernel_backends()


def fastattn_backend_reasons(ctx: Context) -> dict[str, str | None]:
    """``fastattn-<backend>`` -> None when the backend can run on ctx's device, else why not."""
    from fastattn import dispatch

    reasons = {}
    for backend in FASTATTN_BACKENDS:
        try:
            reason = dispatch.backend_unavailable_reason(backend, ctx.device)
        except Exception as exc:  # a broken backend must not stop the suite
            reason = f"{type(exc).__name__}: {exc}"
        if backend == "triton" and reason is None and not ctx.gpu:
            reason = "the Triton interpreter (TRITON_INTERPRET=1) runs kernels in Python: not benchmarked"
        reasons[f"fastattn-{backend}"] = reason
    return reasons


def forced_backend(provider: str) -> str | None:
    """``fastattn-cpu`` -> ``cpu``; ``fastattn-auto`` and other providers -> None."""
    if provider.startswith("fastattn-") and provider[len("fastattn-"):] in FASTATTN_BACKENDS:
        return provider[len("fastattn-"):]
    return None


def package_reason(module: str, pip_name: str | None = None) -> str | None:
    """None when ``module`` can be imported here, else 'not installed'."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"not installed (pip install {pip_name or module})"


def gpu_only_reason(ctx: Context, what: str) -> str | None:
    return None if ctx.gpu else f"{what} runs on CUDA GPUs only"


# ------------------------------------------------------------------------------------------------
# running a workload
# ------------------------------------------------------------------------------------------------


def _tensors_and_params(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, torch.nn.Module):
        yield from value.parameters()
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_and_params(item)


def state_bytes(state: dict) -> int:
    """Bytes held by a workload's inputs (tensors and module parameters)."""
    return sum(t.numel() * t.element_size() for v in state.values() for t in _tensors_and_params(v))


def _grad_leaves(state: dict) -> list[torch.Tensor]:
    return [t for v in state.values() for t in _tensors_and_params(v) if t.requires_grad]


def _first_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def last_level_cache_bytes(device: str) -> int:
    """L2 on a GPU, the largest CPU cache level otherwise (32 MiB if unknown)."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 50 * 2**20))
    best = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        match = re.fullmatch(r"(\d+)([KMG]?)", text)
        if match:
            best = max(best, int(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)])
    return best or 32 * 2**20


def rotation_copies(bytes_per_copy: int, cache_bytes: int, max_copies: int = 8) -> int:
    """How many input copies to cycle through so that together they exceed twice the cache."""
    if bytes_per_copy <= 0:
        return 1
    return max(1, min(max_copies, math.ceil(2 * cache_bytes / bytes_per_copy)))


class Runner:
    """A zero-argument callable running one mode of a workload on rotating input copies."""

    def __init__(self, workload: Workload, mode: str, copies: int | None = None, cache_bytes: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "step" and workload.step is None:
            raise ValueError("this workload has no training step")
        self.workload, self.mode = workload, mode
        first = workload.make_inputs()
        if copies is None:
            copies = rotation_copies(state_bytes(first), cache_bytes, workload.max_copies)
        self.states = [first] + [workload.make_inputs() for _ in range(copies - 1)]
        self.leaves = [_grad_leaves(s) for s in self.states]
        self.grads: list[torch.Tensor | None] = []
        self.outputs: list[torch.Tensor] = []
        if mode in ("bwd", "fwd_bwd"):
            for state in self.states:
                out = _first_tensor(workload.forward(state))
                self.grads.append(None if out.dim() == 0 else torch.randn_like(out))
                if mode == "bwd":
                    self.outputs.append(out)
                del out
        self._order = itertools.cycle(range(len(self.states)))

    @property
    def copies(self) -> int:
        return len(self.states)

    def release(self) -> None:
        """Drop the gradients a previous call left, so they do not count as a baseline."""
        for leaves in self.leaves:
            for t in leaves:
                t.grad = None

    def __call__(self) -> None:
        i = next(self._order)
        if self.mode == "fwd":
            with torch.no_grad():
                self.workload.forward(self.states[i])
        elif self.mode == "step":
            self.workload.step(self.states[i])
        elif self.mode == "bwd":
            for t in self.leaves[i]:
                t.grad = None
            self.outputs[i].backward(self.grads[i], retain_graph=True)
        else:
            for t in self.leaves[i]:
                t.grad = None
            _first_tensor(self.workload.forward(self.states[i])).backward(self.grads[i])


def settle_garbage() -> None:
    """Collect garbage, then freeze what is alive (torch, dynamo, lazily imported modules: hundreds
    of thousands of objects) out of the collector's reach, so that the next collection takes
    milliseconds instead of a second. Live tensors are still freed by reference counting."""
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _unfreeze_registered:
        atexit.register(gc.unfreeze)  # let shutdown free them (nanobind reports leaks otherwise)
        _unfreeze_registered = True


_unfreeze_registered = False


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], None], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# CPU timing. A sample is the mean wall time of ``number`` back-to-back calls, sized to last about
# CPU_SAMPLE_S: long enough that the clock's resolution and the call overhead do not matter, short
# enough (under the scheduler's time slice) that most samples see no preemption at all by other
# processes. Samples are taken in rounds; the result is the smallest round median: a round during
# which other work ran reads high and is discarded, and a median is not fooled by one lucky sample.
CPU_SAMPLE_S = 1e-3
CPU_ROUNDS = 5
CPU_SAMPLES_PER_ROUND = 7


def cpu_clock() -> Callable[[], float]:
    """The clock of CPU samples: on one thread (where torch runs every op inline in the calling
    thread) that thread's CPU time, which a preemption by another process does not advance; with
    more threads the wall clock (the workers' time would not show in the caller's CPU time)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def _cpu_sample(fn: Callable[[], None], number: int, clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    for _ in range(number):
        fn()
    return (clock() - start) / number


def _cpu_plan(fn: Callable[[], None], total_s: float, per_call_s: float | None) -> tuple[int, int, int]:
    """(calls per sample, samples per round, rounds) for an already warm ``fn``."""
    if per_call_s is None or per_call_s <= 0:
        per_call_s = _cpu_sample(fn, 1)
    number = max(1, round(CPU_SAMPLE_S / max(per_call_s, 1e-9)))
    if number > 1:  # a second estimate over a full sample: the first call of a batch is the slowest
        per_call_s = _cpu_sample(fn, number)
        number = max(1, round(CPU_SAMPLE_S / max(per_call_s, 1e-9)))
    sample_s = number * per_call_s
    per_round = max(1, min(CPU_SAMPLES_PER_ROUND, int(total_s / (CPU_ROUNDS * sample_s))))
    rounds = CPU_ROUNDS if per_round > 1 or sample_s * CPU_ROUNDS <= total_s else 3
    return number, per_round, rounds


def cpu_time_interleaved(fns: list[Callable[[], None]], total_s: float,
                         per_call_s: list[float | None] | None = None,
                         clock: Callable[[], float] | None = None) -> list[dict]:
    """cpu_time of several callables (the providers of one case), their rounds interleaved: round r
    of every provider runs before round r + 1 of any, so that a change of load on the machine
    falls on all of them alike instead of on whichever was being timed."""
    per_call_s = per_call_s or [None] * len(fns)
    clock = clock or cpu_clock()
    plans = [_cpu_plan(fn, total_s, pc) for fn, pc in zip(fns, per_call_s)]
    medians: list[list[float]] = [[] for _ in fns]
    samples: list[list[float]] = [[] for _ in fns]
    spent = [0.0] * len(fns)
    for r in range(max(rounds for _, _, rounds in plans)):
        order = list(range(len(fns)))
        order = order[r % len(order):] + order[:r % len(order)]  # no provider always goes first
        for i in order:
            number, per_round, rounds = plans[i]
            if r >= rounds:
                continue
            started = time.perf_counter()
            taken = sorted(_cpu_sample(fns[i], number, clock) for _ in range(per_round))
            spent[i] += time.perf_counter() - started
            medians[i].append(taken[len(taken) // 2])
            samples[i] += taken
    results = []
    for (number, _, _), mine, taken, seconds in zip(plans, medians, samples, spent):
        taken.sort()
        q1, q3 = taken[len(taken) // 4], taken[(3 * len(taken)) // 4]
        results.append({"time_ms": min(mine) * 1e3, "time_iqr_ms": (q3 - q1) * 1e3, "runs": len(taken) * number,
                        "calls_per_sample": number, "timing_s": seconds,
                        "clock": "thread_cpu" if clock is time.thread_time else "wall"})
    return results


def cpu_time(fn: Callable[[], None], total_s: float, per_call_s: float | None = None,
             clock: Callable[[], float] | None = None) -> dict:
    """Min over rounds of the median sample of an already warm ``fn`` (see CPU_SAMPLE_S), within
    about ``total_s`` (at least 3 rounds of one sample each, however slow ``fn`` is)."""
    return cpu_time_interleaved([fn], total_s, [per_call_s], clock)[0]


def time_callable(fn: Callable[[], None], ctx: Context, per_call_s: float | None = None) -> dict:
    """Time of an already warm ``fn`` (GPU: median of do_bench; CPU: see cpu_time), with its
    interquartile range and number of runs."""
    min_run_time, warmup_ms, rep_ms, _ = TIMING[ctx.size]
    if ctx.gpu:
        import triton.testing

        q1, median, q3 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        return {"time_ms": median, "time_iqr_ms": q3 - q1, "runs": None}
    return cpu_time(fn, min_run_time, per_call_s)


def classify_error(exc: BaseException, caught_warnings=()) -> tuple[str, str]:
    """(status, reason) for an exception raised by a provider: oom, unsupported or error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {text}"[:300]
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "oom", reason
    details = [str(w.message).strip().splitlines()[0] for w in caught_warnings if str(w.message).strip()]
    no_kernel = any(text in str(exc) for text in ("No available kernel", "No viable backend"))
    if no_kernel and details:
        reason = (reason + " (" + "; ".join(dict.fromkeys(details)) + ")")[:400]
    unsupported = (NotImplementedError, ValueError, TypeError, ImportError)
    if isinstance(exc, unsupported) or type(exc).__name__ == "BackendError" or no_kernel:
        return "unsupported", reason
    return "error", reason


def cuda_peak_memory(runner: Runner) -> float:
    """MiB a call of ``runner`` allocates on the GPU above what is allocated before it."""
    runner.release()
    settle_garbage()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    runner()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    runner.release()
    return peak / 2**20


# Inputs are rotated only for calls shorter than this: a longer call streams far more data than
# the cache holds (its own traffic evicts the inputs), so building copies would only cost time.
ROTATE_BELOW_S = 0.02


def prepare(workload: Workload, mode: str, ctx: Context) -> tuple[Runner, float]:
    """Probe and warm up one mode of a workload: (the runner, the probe's seconds per call). Errors
    propagate (the provider cannot run this case)."""
    runner = Runner(workload, mode, copies=1)
    runner()  # probe: compiles, autotunes, raises when the provider cannot run this case
    per_call = seconds_per_call(runner, ctx.device)
    copies = rotation_copies(state_bytes(runner.states[0]), last_level_cache_bytes(ctx.device), workload.max_copies)
    if copies > 1 and per_call < ROTATE_BELOW_S:
        runner = Runner(workload, mode, copies=copies)
        for _ in range(copies):  # warm every copy once
            runner()
    return runner, per_call


def time_prepared(prepared: list[tuple[Runner, float]], ctx: Context, memory: bool = True) -> list[dict]:
    """Time prepared runners (the providers of one case and mode): interleaved on the CPU, one after
    another with do_bench on a GPU (plus its peak memory)."""
    if not ctx.gpu:
        timings = cpu_time_interleaved([r for r, _ in prepared], TIMING[ctx.size][0], [pc for _, pc in prepared])
        return [{"per_call_s": pc, "copies": r.copies, **t} for (r, pc), t in zip(prepared, timings)]
    results = []
    for runner, per_call in prepared:
        started = time.perf_counter()
        result = {"per_call_s": per_call, "copies": runner.copies, **time_callable(runner, ctx, per_call)}
        if memory and runner.mode in MEMORY_MODES:
            result["peak_mem_mib"] = cuda_peak_memory(runner)
        result["timing_s"] = time.perf_counter() - started
        results.append(result)
    return results


def measure(workload: Workload, mode: str, ctx: Context, memory: bool = True) -> dict:
    """Probe, warm up and time one mode of a workload (and its GPU peak memory). Errors propagate."""
    return time_prepared([prepare(workload, mode, ctx)], ctx, memory)[0]


@contextlib.contextmanager
def recording_warnings() -> Iterator[list]:
    """Collect warnings (SDPA explains why a kernel is unavailable through them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


# ------------------------------------------------------------------------------------------------
# CPU peak memory in a subprocess
# ------------------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def rss_peak_memory(runner: Runner) -> float:
    """MiB of resident memory a call of ``runner`` adds above the RSS just before it."""
    runner.release()
    settle_garbage()
    base_kib = _proc_status_kib("VmRSS")
    if _reset_peak_rss():
        runner()
        peak_kib = _proc_status_kib("VmHWM")
    else:  # no reset: the process-lifetime peak, an upper bound
        runner()
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner.release()
    return max(peak_kib - base_kib, 0) / 1024


def cpu_peak_memory(module: str, ctx: Context, items: list[dict], timeout_s: float = 600.0) -> Iterator[dict]:
    """Peak memory of each item ({provider, params, mode}) of a family module, measured one after
    another in one fresh subprocess; yields {index, peak_mem_mib} or {index, error} as they come."""
    spec = {"module": module, "ctx": asdict(ctx), "items": items, "deadline_s": timeout_s}
    env = dict(os.environ)
    # A fixed mmap threshold disables glibc's dynamic one: large buffers are mmap'd and returned to
    # the OS when freed, so freed memory neither stays resident nor hides a later allocation.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: a chatty child cannot block on it
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.common", "--memory"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=REPO_ROOT,
            env=env,
        )
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        seen = set()
        for line in proc.stdout:
            if line.startswith("{"):
                record = json.loads(line)
                seen.add(record["index"])
                yield record
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.seek(0)
        tail = stderr.read().strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    for index in range(len(items)):
        if index not in seen:
            yield {"index": index, "error": f"memory subprocess failed: {tail[0][:300]}"}


def _memory_subprocess_main() -> None:
    spec = json.load(sys.stdin)
    module = importlib.import_module(spec["module"])
    ctx = Context(**spec["ctx"])
    ctx.apply()
    settle_garbage()
    deadline = time.monotonic() + spec.get("deadline_s", 600.0)
    for index, item in enumerate(spec["items"]):
        if time.monotonic() > deadline:
            record = {"index": index, "error": "skipped: the memory subprocess ran out of time"}
        else:
            try:
                runner = Runner(module.build(item["provider"], item["params"], ctx), item["mode"], copies=1)
                runner()  # warm-up: thread pools, lazy initialisation, optimizer state
                record = {"index": index, "peak_mem_mib": rss_peak_memory(runner)}
                del runner
            except Exception as exc:
                record = {"index": index, "error": classify_error(exc)[1]}
        print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------------
# the stamp
# ------------------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device()) if device == "cuda" else cpu_model_name()


def device_slug(name: str, device: str) -> str:
    """A directory name for a device: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3',
    'Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.0GHz' -> 'cpu-intel-xeon-platinum-8480'."""
    text = name.lower()
    if device != "cuda":
        text = re.sub(r"\((r|tm)\)", " ", text)
        text = re.sub(r"@.*$", " ", text)
        text = re.sub(r"\b(cpu|processor|\d+-core)\b", " ", text)
    slug = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    if device != "cuda":
        slug = "cpu-" + slug if slug else "cpu"
    return slug or device


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect_stamp(device: str) -> dict:
    """Device, driver, library versions, commit and date: what a result must carry to be compared."""
    name = device_name(device)
    commit = _run(["git", "rev-parse", "HEAD"])
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    driver = None
    if device == "cuda":
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = driver.splitlines()[0] if driver else None
    cudnn = torch.backends.cudnn.version() if device == "cuda" and torch.backends.cudnn.is_available() else None
    return {
        "device": device,
        "device_name": name,
        "device_slug": device_slug(name, device),
        "driver": driver,
        "cpu_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "commit": commit,
        "commit_dirty": dirty,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "other_runnable_tasks": None if device == "cuda" else other_runnable_tasks(samples=10),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def other_runnable_tasks(samples: int = 20, interval_s: float = 0.01) -> float | None:
    """Mean number of runnable tasks other than this one, from /proc/stat's procs_running sampled
    over ``samples * interval_s`` seconds (None where there is no /proc/stat)."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat") as stat:
                counts += [int(line.split()[1]) for line in stat if line.startswith("procs_running")]
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0.0, sum(counts) / len(counts) - 1) if counts else None


def cpu_is_busy(ctx: Context) -> bool:
    """Other processes compete for the cores (CPU runs only): on average half a task or more other
    than this one is runnable (the load average is not used: it lags, and counts the build that
    `make bench` runs just before). A multi-threaded op
    then waits at each parallel region for its descheduled worker, which the scheduler runs again
    only after the other process's time slice: every call reads ~8 ms however cheap it is."""
    if ctx.gpu:
        return False
    others = other_runnable_tasks()
    return others is not None and others >= 0.5


def choose_cpu_threads(ctx: Context) -> None:
    """One thread when the user left the count open and other processes compete for the cores."""
    if ctx.threads is None and cpu_is_busy(ctx):
        ctx.threads = 1


def busy_warning(stamp: dict) -> str | None:
    """A warning when other processes competed for the CPUs at the start of a CPU run."""
    load, cores, others = stamp.get("load_average_1m"), stamp.get("cpu_count"), stamp.get("other_runnable_tasks")
    if stamp.get("device") != "cpu" or not cores:
        return None
    if others is not None and others >= 0.5:
        what = f"{others:.1f} other runnable tasks on {cores} cores"
    elif load is not None and load > cores:
        what = f"load average {load:g} on {cores} cores"
    else:
        return None
    threads = stamp.get("cpu_threads")
    consequence = ("timed on one thread, timings may still carry some interference" if threads == 1
                   else "multi-threaded CPU timings are unreliable")
    return f"the machine was busy ({what}): {consequence}"


def stamp_line(stamp: dict) -> str:
    """One line of Markdown describing where and when results were taken."""
    parts = [f"**{stamp['device_name']}**"]
    if stamp.get("driver"):
        parts.append(f"driver {stamp['driver']}")
    if stamp.get("device") == "cpu":
        parts.append(f"{stamp.get('cpu_threads')} threads")
    parts.append(f"torch {stamp.get('torch')}")
    if stamp.get("triton"):
        parts.append(f"Triton {stamp['triton']}")
    if stamp.get("cuda"):
        parts.append(f"CUDA {stamp['cuda']}")
    commit = (stamp.get("commit") or "unknown")[:10] + ("+dirty" if stamp.get("commit_dirty") else "")
    parts.append(f"commit `{commit}`")
    parts.append(str(stamp.get("date", "")))
    warning = busy_warning(stamp)
    return " · ".join(parts) + (f"  \n**Warning:** {warning}." if warning else "")


# ------------------------------------------------------------------------------------------------
# results files
# ------------------------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def load_family_results(directory: Path) -> list[dict]:
    """Every family result file (``<family>.json``) in a device directory, in suite order."""
    from benchmarks import FAMILIES

    found = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA_VERSION and "family" in data:
            found.append(data)
    order = {name: i for i, name in enumerate(FAMILIES)}
    return sorted(found, key=lambda d: (order.get(d["family"], len(order)), d["family"]))


if __name__ == "__main__":
    if sys.argv[1:] == ["--memory"]:
        _memory_subprocess_main()
    else:
        sys.exit("usage: python -m benchmarks.common --memory  (reads its spec on stdin)")
