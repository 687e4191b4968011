"""What the Triton kernel files (attention, softmax, ffn, norm) share: the interpreter flag, the
dtypes they run, constants, and the host-side launch heuristics. Named once here, imported there.
"""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

# TRITON_INTERPRET=1 runs the kernels in Triton's interpreter on CPU tensors (the tests without a GPU).
# Read once: Triton itself reads it when the kernels are decorated.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The input dtypes every Triton kernel takes (arithmetic in float32; float64 stays on the reference).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x·LOG2E)
LN2 = 0.6931471805599453  # ln(2): ln(x) = log2(x)·LN2
# The same as constexprs, for use inside @triton.jit functions (which read only constexpr globals).
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1 (as triton.next_power_of_2)."""
    return 1 << max(0, (n - 1).bit_length())


def num_warps(tile_elements: int, per_thread: int, max_warps: int) -> int:
    """Warps for a row tile of that many elements, about ``per_thread`` elements per thread, 4 to
    ``max_warps``."""
    return max(4, min(max_warps, tile_elements // (32 * per_thread)))


def _cuda_index(device) -> int | None:
    """The CUDA device index of ``device`` (a torch.device, a string, an index, or None for the
    current device), None when it is not a CUDA device or there is none."""
    if not torch.cuda.is_available():
        return None
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _shared_memory_of(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024


def shared_memory_limit(device=None) -> int:
    """Bytes of shared memory one program may use on ``device`` (default: the current GPU; A100
    ~163 KiB, H100 ~227 KiB), 0 without a CUDA device. Read once per device index and cached."""
    index = _cuda_index(device)
    return 0 if index is None else _shared_memory_of(index)


@functools.cache
def _capability_of(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def capability(device=None) -> int:
    """The compute capability of ``device`` (default: the current GPU) as 80, 90, ...; 90 without a
    CUDA device (the Hopper lists). Cached per device index."""
    index = _cuda_index(device)
    return 90 if index is None else _capability_of(index)


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (cached per device index)."""
    index = _cuda_index(device)
    if index is None:
        raise ValueError(f"sm_count: device must be a CUDA device, got {device}")
    return _sm_count_of(index)
