"""Static Hopper/Ampere check of every Triton kernel: ``make check-sass`` (no GPU needed).

Each kernel is launched once on meta tensors with a stand-in for ``wrap_triton`` that records the
launch instead of running it; every autotune candidate that the kernel's own pruning keeps for a
target (sm_90a with the H100/H200's 227 KiB of shared memory per block, sm_80 with the A100's
163 KiB) is then compiled with ``triton.compile`` for that target, and the PTX is assembled again
with the ptxas Triton uses, ``-v``, to read registers, spills and warnings. From the cubin's SASS
(cuobjdump) come the tensor-core instruction counts and, for the attention kernels, the number of
instructions one iteration of the main loop executes on its unmasked path.

The CUDA kernels (csrc/cuda/*.cu) are compiled with nvcc -Xptxas -v for the same targets, one
process per (file, target), with the Makefile's check-cuda flags; a row per kernel instantiation
(config = its template arguments): registers, spills, shared memory (static, plus the dynamic size
its launcher asks for: CUDA_DYNAMIC_SMEM), warps per SM at its launch bound, mma.sync instructions
counted in the PTX nvcc kept (this CUDA may ship no cuobjdump), "serialized" n/a (no wgmma).

Fails (exit 1) on: a C7515 warning (wgmma serialised) in any compiled candidate; spills or shared
memory over the target's limit in any candidate the pruning keeps, the fixed (FASTATTN_AUTOTUNE=0)
configs and the decode config included, and in any CUDA kernel; a CUDA kernel whose dynamic shared
memory size is unknown; the d128 128x128 3-stage forward missing from the sm_90a list; a forward
loop longer than the Triton tutorial's (LOOP_BUDGET). Writes benchmarks/results/static/sass.{json,md}
and, with --readme, the README's static section. With --merge, the rows of the families not
compiled in this run are kept from the existing sass.json (e.g. `--only cuda --merge`).

    python -m benchmarks.check_sass [--jobs N] [--only attention|cuda|...] [--merge] [--readme]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import heapq
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "benchmarks" / "results" / "static"
README_BEGIN, README_END = "<!-- static-sass:begin -->", "<!-- static-sass:end -->"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    capability: int
    block_smem: int  # opt-in shared memory per block (bytes)
    sm_smem: int  # shared memory per SM
    mma: str  # the SASS mnemonic of its tensor-core instruction


# H100/H200: 227 KiB per block, 228 KiB per SM; A100: 163 KiB per block, 164 KiB per SM
# (CUDA C++ Programming Guide, "Features and Technical Specifications", compute capability 9.0/8.0).
TARGETS = {
    "sm_90a": Target("sm_90a", 90, 227 * 1024, 228 * 1024, "HGMMA"),
    "sm_80": Target("sm_80", 80, 163 * 1024, 164 * 1024, "HMMA"),
}

# Instructions on the shortest path through one forward-loop iteration of Triton's 06-fused-attention
# tutorial (its block-pointer kernel, bf16, 128x128 tiles, 8 warps, 3 stages, non-causal, sm_90a,
# Triton 3.6), counted by hot_loop() below on a scratch copy kept outside the project (see
# benchmarks/NOTES.md). The forward's main loop, same tiles, must not be longer.
LOOP_BUDGET = {64: 574, 128: 806}


def occupancy_warps_per_sm(registers: int, smem_bytes: int, warps: int, target: Target) -> int:
    """Resident warps per SM: 64K registers allocated per warp in units of 256, at most 64 warps and 32
    blocks, shared memory per SM with 1 KiB reserved per block (CUDA occupancy calculator rules)."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    blocks_by_regs = (65536 // regs_per_warp) // warps
    blocks_by_smem = target.sm_smem // (smem_bytes + 1024) if smem_bytes else 32
    blocks = min(blocks_by_regs, blocks_by_smem, 32, 64 // warps)
    return blocks * warps


# --------------------------------------------------------------------------------------------
# launches recorded on meta tensors
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: object  # JITFunction or Autotuner
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(Launch(self.kernel, args, kwargs))


@contextlib.contextmanager
def recorded_launches(*modules):
    """Replace ``wrap_triton`` in the kernel modules by a recorder; yields the list of launches."""
    log: list[Launch] = []
    saved = [(m, m.wrap_triton) for m in modules]
    try:
        for m in modules:
            m.wrap_triton = lambda kernel: _Recorder(kernel, log)
        yield log
    finally:
        for m, fn in saved:
            m.wrap_triton = fn


def _raw(op):
    """The Python body of a triton_op (run directly on meta tensors, outside the dispatcher)."""
    return getattr(op, "_init_fn", op)


_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.bool: "i1",
           torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8"}


def _jit_fn(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


def signature_of(kernel, launch: Launch, config: dict):
    """(signature, constexprs, attrs) for triton.compile, as the runtime would specialise the launch:
    pointers and integers divisible by 16 get the divisibility hint, bools are i1, floats fp32."""
    fn = _jit_fn(kernel)
    # parameters with defaults the launch leaves out (e.g. ONE_LOOP) take their defaults
    params = inspect.signature(fn.fn).parameters
    values = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    values.update(zip(fn.arg_names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k in fn.arg_names})
    values.update({k: v for k, v in config.items() if k in fn.arg_names})
    constexpr_names = {fn.arg_names[i] for i in fn.constexprs}
    no_spec = set(getattr(fn, "do_not_specialize", ()) or ())
    no_spec |= {fn.arg_names[i] for i in no_spec if isinstance(i, int)}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = values[name]
        if name in constexpr_names or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in no_spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    return signature, constexprs, attrs


# --------------------------------------------------------------------------------------------
# the jobs: one per (kernel, config, target)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    family: str
    kernel: str
    case: str  # shape, dtype, flags
    config: str  # block sizes, warps, stages
    role: str  # "autotune", "fixed" (FASTATTN_AUTOTUNE=0), "decode", "only" (not autotuned)
    target: str
    module: str  # where the kernel lives, to re-import it in the worker
    fn_name: str
    signature: dict
    constexprs: dict
    attrs: dict
    warps: int
    stages: int
    loop: bool = False  # count the main loop's instructions


def _config_label(kwargs: dict, warps: int, stages: int) -> str:
    blocks = "x".join(str(v) for k, v in kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{warps} s{stages}" + (" 1loop" if kwargs.get("ONE_LOOP") else "")


def _jobs_for(family, launch, case, configs, target, loop=False):
    """configs: [(kwargs, warps, stages, role)]"""
    fn = _jit_fn(launch.kernel)
    jobs = []
    for kwargs, warps, stages, role in configs:
        signature, constexprs, attrs = signature_of(launch.kernel, launch, kwargs)
        jobs.append(Job(
            family, fn.__name__, case, _config_label(kwargs, warps, stages), role, target.name,
            fn.fn.__module__, fn.__name__, signature, constexprs, attrs, warps, stages, loop,
        ))
    return jobs


def attention_jobs(target: Target, quick: bool = False) -> list[Job]:
    from fastattn.triton import attention as A

    jobs = []
    meta = dict(device="meta")
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
        for d in (64, 128) if quick else (64, 80, 96, 128, 256):  # 80, 96: the forward's split heads
            for causal in (False, True):
                case = f"{_DTYPES[dtype]} d{d}{' causal' if causal else ''}"
                q = torch.empty(1, 2, 4096, d, dtype=dtype, **meta)
                dec = torch.empty(1, 2, 1, d, dtype=dtype, **meta)
                with recorded_launches(A) as log:
                    out, lse = _raw(A.attention_fwd)(q, q, q, None, 0.125, causal, 0.0, 0)
                    _raw(A.attention_fwd)(dec, q, q, None, 0.125, causal, 0.0, 0)
                    _raw(A.attention_bwd)(out, q, q, q, out, lse, None, 0.125, causal, 0.0, 0, True, True)
                fwd, decode, delta, dkdv, dq = log
                jobs += _jobs_for("attention", delta, case, [({}, 4, 1, "only")] if causal is False else [], target)
                for kind, launch in (("fwd", fwd), ("decode", decode), ("dkdv", dkdv), ("dq", dq)):
                    configs = _attention_configs(A, kind, d, causal, dtype, target)
                    jobs += _jobs_for("attention", launch, case + (" decode" if kind == "decode" else ""),
                                      configs, target, loop=True)
    return jobs


def _attention_configs(A, kind, d, causal, dtype, target):
    """The autotune list the runtime keeps on ``target``, plus the fixed config (FASTATTN_AUTOTUNE=0)."""
    # the columns the runtime computes: the forward splits a non-power-of-two head, the backward pads
    bd = sum(A._head_pieces(d)) if kind in ("fwd", "decode") else A._block_dim(d)
    elem = torch.empty(0, dtype=dtype).element_size()
    as_kwargs = lambda c: (A.triton_config(kind, c).kwargs, c.warps, c.stages)  # noqa: E731
    if kind == "decode":
        decode = A._kernel_configs("decode", bd, bd, causal, elem, capability=target.capability)
        return [(*as_kwargs(c), "decode") for c in decode]
    shared = dict(smem_limit=target.block_smem, capability=target.capability)
    tuned = A._kernel_configs(kind, bd, bd, causal, elem, autotune=True, **shared)
    fixed = A._kernel_configs(kind, bd, bd, causal, elem, autotune=False, **shared)
    out = [(*as_kwargs(c), "autotune") for c in tuned]
    return out + [(*as_kwargs(c), "fixed") for c in fixed if c not in tuned]


def softmax_jobs(target: Target, quick: bool = False) -> list[Job]:
    from fastattn.triton import softmax as S

    jobs = []
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
        for n in (1024, 16384, 65536):  # single pass (two widths) and the split-row path
            x = torch.empty(4096 if n <= 16384 else 64, n, dtype=dtype, device="meta")
            with recorded_launches(S) as log:
                S._launch_forward(x, None, torch.empty_like(x), 1.0, False, False)
                S._launch_backward(x, x, torch.empty_like(x), 1.0, False)
            for launch in log:
                kw = {k: v for k, v in launch.kwargs.items() if k != "num_warps"}
                configs = [(kw, launch.kwargs.get("num_warps", 4), 1, "only")]
                jobs += _jobs_for("softmax", launch, f"{_DTYPES[dtype]} {x.size(0)}x{n}", configs, target)
    return _dedup(jobs)


def norm_jobs(target: Target, quick: bool = False) -> list[Job]:
    from fastattn.triton import norm as N

    jobs = []
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
        for n in (1024, 4096, 16384):
            x = torch.empty(4096, n, dtype=dtype, device="meta")
            w = torch.empty(n, dtype=dtype, device="meta")
            for is_rms in (False, True):
                with recorded_launches(N) as log:
                    y, s, mean, rstd = N._forward(x, w, None if is_rms else w, 1e-5, x, is_rms)
                    N._backward(y, None, s, w, mean, rstd, True, not is_rms, is_rms)
                for launch in log:
                    kw = {k: v for k, v in launch.kwargs.items() if k != "num_warps"}
                    configs = [(kw, launch.kwargs.get("num_warps", 4), 1, "only")]
                    case = f"{_DTYPES[dtype]} {'rms' if is_rms else 'layer'} 4096x{n} +residual"
                    jobs += _jobs_for("norm", launch, case, configs, target)
    return _dedup(jobs)


def ffn_jobs(target: Target, quick: bool = False) -> list[Job]:
    from fastattn.triton import ffn as F

    jobs = []
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
        for activation in ("gelu", "swiglu"):
            gated = activation in F.GATED_ACTIVATIONS
            x = torch.empty(4096, 1024, dtype=dtype, device="meta")
            w1 = torch.empty(4096 * (2 if gated else 1), 1024, dtype=dtype, device="meta")
            w2 = torch.empty(1024, 4096, dtype=dtype, device="meta")
            with recorded_launches(F) as log:
                _raw(F.ffn_fwd)(x, w1, None, w2, None, activation, 0.0, 0)
                _raw(F.ffn_bwd)(x, x, w1, None, w2, activation, 0.0, 0, True, True, True)
            for launch, tiles, accumulators in ((log[0], F._FWD_TILES, 2 if gated else 1),
                                                (log[1], F._BWD_TILES, 3 if gated else 2)):
                fn = _jit_fn(launch.kernel)
                named = {**dict(zip(fn.arg_names, launch.args)), **launch.kwargs}
                configs = [triton.Config({"BLOCK_M": m, "BLOCK_H": h, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w,
                                         num_stages=s) for m, h, k, w, s in tiles]
                kept = F._prune(configs, named, accumulators, shared_memory=target.block_smem, capability=target.capability)
                case = f"{_DTYPES[dtype]} {activation} 4096x1024x4096"
                jobs += _jobs_for("ffn", launch, case,
                                  [(c.kwargs, c.num_warps, c.num_stages, "autotune") for c in kept], target)
    return jobs


def _dedup(jobs):
    seen, out = set(), []
    for j in jobs:
        key = (j.kernel, j.config, j.target, json.dumps(j.constexprs, sort_keys=True, default=str),
               json.dumps(j.signature, sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append(j)
    return out


FAMILIES = {"attention": attention_jobs, "softmax": softmax_jobs, "norm": norm_jobs, "ffn": ffn_jobs}


# --------------------------------------------------------------------------------------------
# compile and read the report (in worker processes)
# --------------------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)")


def parse_sass(sass: str) -> list[tuple[int, str]]:
    return [(int(m.group(1), 16), m.group(2).strip()) for m in _SASS_LINE.finditer(sass)]


def hot_loop(instructions: list[tuple[int, str]], mma: str) -> dict | None:
    """The innermost loop (backward branch) with the most tensor-core instructions, its size, and
    the number of instructions on the shortest path from its head to its back edge: one iteration
    of its cheapest path (for the attention kernels, a block that needs no mask)."""
    index = {addr: i for i, (addr, _) in enumerate(instructions)}
    loops = []
    for i, (addr, text) in enumerate(instructions):
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
            head = index[int(m.group(1), 16)]
            n_mma = sum(mma in t for _, t in instructions[head:i + 1])
            if n_mma:
                loops.append((n_mma, head, i))
    innermost = [lp for lp in loops if not any(o is not lp and lp[1] <= o[1] and o[2] <= lp[2] for o in loops)]
    if not innermost:
        return None
    n_mma, head, tail = max(innermost, key=lambda lp: (lp[0], lp[2] - lp[1]))
    return {"loop_instructions": tail - head + 1, "path_instructions": _shortest_path(instructions, index, head, tail),
            "loop_mma": n_mma}


def _shortest_path(instructions, index, head, tail) -> int:
    dist, queue = {head: 1}, [(1, head)]
    while queue:
        d, i = heapq.heappop(queue)
        if i == tail:
            return d
        if d > dist.get(i, math.inf):
            continue
        text = instructions[i][1]
        m = _BRANCH.search(text)
        successors = []
        if m:
            target = index.get(int(m.group(1), 16))
            if target is not None and head <= target <= tail:
                successors.append(target)
            if text.startswith("@"):
                successors.append(i + 1)
        elif not text.startswith("EXIT"):
            successors.append(i + 1)
        for j in successors:
            if j <= tail and d + 1 < dist.get(j, math.inf):
                dist[j] = d + 1
                heapq.heappush(queue, (d + 1, j))
    return tail - head + 1


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def run_job(job: Job) -> dict:
    import importlib

    target = TARGETS[job.target]
    fn = _jit_fn(getattr(importlib.import_module(job.module), job.fn_name))
    started = time.time()
    row = {k: v for k, v in dataclasses.asdict(job).items() if k not in ("signature", "constexprs", "attrs", "module", "fn_name")}
    try:
        src = ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", target.capability, 32),
                                  options={"num_warps": job.warps, "num_stages": job.stages})
    except Exception as exc:  # a candidate that does not compile is reported, and fails the check
        return {**row, "error": f"{type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}"[:300]}
    ptxas = get_ptxas(target.capability).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={target.name}", str(ptx), "-o", str(cubin)],
                             capture_output=True, text=True).stderr
        cuobjdump = Path(ptxas).with_name("cuobjdump")
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True).stdout
    registers = int(_REGISTERS.search(log).group(1))
    spill_st, spill_ld = map(int, _SPILLS.search(log).groups())
    instructions = parse_sass(sass)
    smem = int(compiled.metadata.shared)
    row.update(
        registers=registers, spill_bytes=spill_st + spill_ld, smem_bytes=smem,
        occupancy_warps=occupancy_warps_per_sm(registers, smem, job.warps, target),
        mma=sum(target.mma in t for _, t in instructions), serialized="C7515" in log,
        instructions=len(instructions), seconds=round(time.time() - started, 1),
        warnings=[line.strip() for line in log.splitlines() if "warning" in line.lower() or "C7515" in line],
    )
    if job.loop:
        row.update(hot_loop(instructions, target.mma) or {})
    return row


# --------------------------------------------------------------------------------------------
# the CUDA kernels (csrc/cuda): nvcc -Xptxas -v, one compile per (file, target)
# --------------------------------------------------------------------------------------------

CUDA_DIR = ROOT / "csrc" / "cuda"
# The Makefile's check-cuda flags (torch's half/bfloat16 macros included): what the extension builds.
NVCC_FLAGS = ["-std=c++17", "-O2", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_PTX_ENTRY = re.compile(r"^(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)\s*\(", re.M)
_MAXNTID = re.compile(r"\.maxntid\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?")
_ELEMENT_BYTES = {"__half": 2, "__nv_bfloat16": 2, "float": 4}


def parse_ptxas_log(log: str) -> list[dict]:
    """Per kernel of a ``ptxas -v`` log (nvcc -Xptxas -v): mangled name, target, registers, spill bytes
    (stores + loads), stack frame and static shared memory. ptxas prints "Compiling entry function",
    then the stack/spill line, then "Used N registers[, ... M bytes smem]"."""
    rows, current = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"mangled": m.group(1), "target": m.group(2), "registers": None, "spill_bytes": 0,
                       "stack_bytes": 0, "static_smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = _STACK.search(line)
        if m:
            current["stack_bytes"] = int(m.group(1))
            current["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["static_smem"] = int(m.group(2) or 0)
    return rows


def parse_ptx_entries(ptx: str) -> dict[str, dict]:
    """Per .entry of a PTX module: mma.sync instructions (static count: the kernels unroll their tile
    loops), threads per block from .maxntid (None without __launch_bounds__), and whether the body
    takes the address of the dynamic shared memory (csrc/cuda/common.cuh: fastattn_dynamic_smem)."""
    starts = [(m.start(), m.group(1)) for m in _PTX_ENTRY.finditer(ptx)]
    out = {}
    for (start, name), end in zip(starts, [s for s, _ in starts[1:]] + [len(ptx)]):
        body = ptx[start:end]
        ntid = _MAXNTID.search(body)
        threads = math.prod(int(g) for g in ntid.groups() if g) if ntid else None
        out[name] = {"mma": len(re.findall(r"\bmma\.sync\b", body)), "threads": threads,
                     "dynamic_smem": "fastattn_dynamic_smem" in body}
    return out


def demangle(names: list[str]) -> list[str]:
    """c++filt on each name; the mangled names themselves when c++filt is missing."""
    try:
        done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return list(names)
    lines = done.stdout.splitlines()
    return lines if len(lines) == len(names) else list(names)


def split_kernel_name(demangled: str) -> tuple[str, list[str]]:
    """'void ns::(anonymous namespace)::k<__half, 128, 32>(Params, bool)' -> ('k', ['__half', '128', '32'])."""
    text = demangled.replace("(anonymous namespace)::", "")
    if text.startswith("void "):
        text = text[5:]
    depth, cut = 0, len(text)
    for i, ch in enumerate(text):  # the parameter list starts at the first '(' outside the template arguments
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            cut = i
            break
    text = text[:cut]
    if "<" not in text:
        return text.rsplit("::", 1)[-1], []
    name, args = text[: text.index("<")], text[text.index("<") + 1: text.rindex(">")]
    parts, depth, piece = [], 0, ""
    for ch in args:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            parts.append(piece.strip())
            piece = ""
        else:
            piece += ch
    parts.append(piece.strip())
    return name.rsplit("::", 1)[-1], [p for p in parts if p]


def _ints(args):
    return [int(a) for a in args[1:]]


# Dynamic shared memory of each kernel that takes it, from its template arguments: the formulas of its
# launcher (csrc/cuda/attention_{fwd,bwd}.cu), written again here. A kernel whose PTX addresses the
# dynamic shared memory but is missing here fails the check, so a new kernel cannot go unmeasured.
CUDA_DYNAMIC_SMEM = {
    # <T, D, BN, warps, stages>: Q (16·warps rows) + stages × (K + V) of BN rows, D + 8 per row
    "attention_fwd_mma_kernel": lambda e, d, bn, w, st: (16 * w + 2 * st * bn) * (d + 8) * e,
    # <T, D, BN>: float Q (16 rows), K, V (BN rows) of D + 1, P (16 × BN + 1)
    "attention_fwd_simple_kernel": lambda e, d, bn: 4 * ((16 + 2 * bn) * (d + 1) + 16 * (bn + 1)),
    # <T, D, BM, warps, stages>: K, V (16·warps rows) + stages × (Q + dO) of BM rows; lse, delta
    "attention_bwd_dkdv_mma_kernel": lambda e, d, bm, w, st: (2 * 16 * w + 2 * st * bm) * (d + 8) * e + 4 * 2 * st * bm,
    # <T, D, BN, warps, stages>: Q, dO (16·warps rows) + stages × (K + V) of BN rows
    "attention_bwd_dq_mma_kernel": lambda e, d, bn, w, st: (2 * 16 * w + 2 * st * bn) * (d + 8) * e,
    # <T, D, BN, BM>: float K, V, Q, dO of D + 1; P and dS (BM × BN + 1); lse, delta
    "attention_bwd_dkdv_simple_kernel": lambda e, d, bn, bm: 4 * ((2 * bn + 2 * bm) * (d + 1) + 2 * bm * (bn + 1) + 2 * bm),
    # <T, D, BM, BN>: float Q, dO, K, V of D + 1; dS (BM × BN + 1); lse, delta
    "attention_bwd_dq_simple_kernel": lambda e, d, bm, bn: 4 * ((2 * bn + 2 * bm) * (d + 1) + bm * (bn + 1) + 2 * bm),
}


def cuda_rows(source: str, target: Target, log: str, ptx: str) -> list[dict]:
    """Table rows of one nvcc compile: its ptxas -v log and the PTX it assembled."""
    kernels = parse_ptxas_log(log)
    entries = parse_ptx_entries(ptx)
    rows = []
    for k, full in zip(kernels, demangle([k["mangled"] for k in kernels])):
        name, args = split_kernel_name(full)
        entry = entries.get(k["mangled"], {"mma": 0, "threads": None, "dynamic_smem": False})
        smem, unknown = k["static_smem"], False
        if entry["dynamic_smem"]:
            formula = CUDA_DYNAMIC_SMEM.get(name)
            if formula is None or not args or args[0] not in _ELEMENT_BYTES:
                unknown = True
            else:
                smem += formula(_ELEMENT_BYTES[args[0]], *_ints(args))
        threads = entry["threads"]
        registers = k["registers"] or 0
        rows.append({
            "family": "cuda", "kernel": name, "case": source, "config": ", ".join(args), "role": "only",
            "target": target.name, "registers": registers, "spill_bytes": k["spill_bytes"], "smem_bytes": smem,
            "smem_unknown": unknown, "threads": threads,
            "occupancy_warps": occupancy_warps_per_sm(registers, smem, threads // 32, target) if threads else None,
            "mma": entry["mma"], "serialized": None, "warnings": [
                line.strip() for line in log.splitlines() if "warning" in line.lower() and k["mangled"] in line],
        })
    return rows


def compile_cuda(source: Path, target: Target, nvcc: str = "nvcc") -> list[dict]:
    """nvcc -Xptxas -v on one file for one target, keeping the PTX (--keep) to count mma.sync."""
    started = time.time()
    arch = target.name
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *NVCC_FLAGS, f"-arch={arch}", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v", "--keep", "--keep-dir", tmp,
               "-c", str(source), "-o", str(Path(tmp, "out.o"))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return [{"family": "cuda", "kernel": source.name, "case": source.name, "config": "", "role": "only",
                     "target": arch, "error": (done.stderr.strip().splitlines() or ["nvcc failed"])[-1][:300]}]
        # -arch=sm_80 keeps <stem>.ptx; -arch=sm_90a keeps <stem>.compute_90a.ptx (and a compute_90 one)
        candidates = [Path(tmp, f"{source.stem}.compute_{arch.removeprefix('sm_')}.ptx"), Path(tmp, f"{source.stem}.ptx")]
        ptx_file = next((c for c in candidates if c.exists()), None)
        ptx = ptx_file.read_text() if ptx_file else ""
    rows = cuda_rows(source.name, target, done.stderr + done.stdout, ptx)
    for r in rows:
        r["seconds"] = round(time.time() - started, 1)
    return rows


def cuda_check(targets: list[Target], jobs: int, nvcc: str | None = None) -> list[dict] | None:
    """Rows for every kernel of csrc/cuda/*.cu on every target; None when there is no nvcc."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    nvcc = nvcc or os.environ.get("NVCC", "nvcc")
    if shutil.which(nvcc) is None:
        return None
    work = [(src, t) for src in sorted(CUDA_DIR.glob("*.cu")) for t in targets]
    with ThreadPoolExecutor(max(1, jobs)) as pool:  # the work is in nvcc processes
        results = pool.map(lambda w: compile_cuda(w[0], w[1], nvcc), work)
        return [row for rows in results for row in rows]


# --------------------------------------------------------------------------------------------
# verdicts, table, README
# --------------------------------------------------------------------------------------------


def failures(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        where = f"{r['kernel']} [{r['case']}] {r['config']} {r['target']}"
        if "error" in r:
            out.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["serialized"]:
            out.append(f"{where}: wgmma serialised (ptxas C7515)")
        if r["spill_bytes"]:
            out.append(f"{where}: {r['spill_bytes']} bytes of spills")
        if r.get("smem_unknown"):
            out.append(f"{where}: uses dynamic shared memory of a size check_sass.CUDA_DYNAMIC_SMEM does not know")
        if r["smem_bytes"] > TARGETS[r["target"]].block_smem:
            out.append(f"{where}: {r['smem_bytes']} B of shared memory > {TARGETS[r['target']].block_smem} B")
    fwd = [r for r in rows if r["kernel"] == "_attn_fwd_kernel" and "error" not in r]
    if fwd and not any(r["target"] == "sm_90a" and r["case"] == "bf16 d128" and r["config"] == "128x128 w8 s3"
                       and r["role"] == "autotune" for r in fwd):
        out.append("_attn_fwd_kernel bf16 d128 sm_90a: the 128x128 3-stage config is not among the kept candidates")
    for d, budget in LOOP_BUDGET.items():
        for r in fwd:
            if budget and r["target"] == "sm_90a" and r["case"] == f"bf16 d{d}" and r["config"] == "128x128 w8 s3" \
                    and r.get("path_instructions", 0) > budget:
                out.append(f"_attn_fwd_kernel bf16 d{d} 128x128: {r['path_instructions']} instructions per loop "
                           f"iteration > the tutorial's {budget}")
    return out


COLUMNS = ("kernel", "case", "config", "role", "target", "registers", "spill_bytes", "smem_bytes", "occupancy_warps",
           "mma", "serialized", "path_instructions")


def markdown(rows: list[dict], stamp: dict, with_failures: bool = True) -> str:
    head = ["kernel", "case", "config", "role", "target", "regs", "spills (B)", "smem (KiB)", "warps/SM", "mma",
            "serialized", "loop instr."]
    lines = [f"Static check of the Triton kernels and of the CUDA kernels of csrc/cuda ({stamp['date']}, Triton "
             f"{stamp['triton']}, torch {stamp['torch']}, {stamp.get('nvcc', 'no nvcc')}, commit {stamp['commit']}): "
             "`make check-sass`. CUDA rows: case = source file, config = template arguments, mma = mma.sync in the "
             "PTX, warps/SM at the kernel's launch bound, smem = static + the launcher's dynamic size."
             + (f" Kept from an earlier run: {stamp['kept']}." if stamp.get("kept") else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['case']} | {r['config']} | {r['role']} | {r['target']} | "
                         f"error: {r['error']} |" + " |" * 7)
            continue
        serialized = "n/a" if r["serialized"] is None else "yes" if r["serialized"] else "no"  # n/a: no wgmma (CUDA)
        occupancy = "" if r["occupancy_warps"] is None else r["occupancy_warps"]
        cells = [r["kernel"], r["case"], r["config"], r["role"], r["target"], r["registers"], r["spill_bytes"],
                 f"{r['smem_bytes'] / 1024:.0f}", occupancy, r["mma"], serialized, r.get("path_instructions", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if stamp.get("note"):
        lines += ["", stamp["note"]]
    if with_failures and (bad := failures(rows)):
        lines += ["", "Failures:", ""] + [f"- {line}" for line in bad]
    return "\n".join(lines) + "\n"


def readme_section(rows: list[dict], stamp: dict) -> str:
    """The attention forward/backward rows the README shows: the sm_90a bf16 candidates for d64/d128."""
    keep = [r for r in rows if r["family"] == "attention" and r["target"] == "sm_90a" and "error" not in r
            and r["case"] in ("bf16 d64", "bf16 d128", "bf16 d128 causal") and r["kernel"] != "_attn_bwd_delta_kernel"]
    body = markdown(keep, {k: v for k, v in stamp.items() if k != "note"}, with_failures=False).split("\n", 2)[2]
    total = len([r for r in rows if "error" not in r])
    bad = failures(rows)
    verdict = "no serialized wgmma, no spills, shared memory within the limit" if not bad else f"{len(bad)} failures"
    return (f"{README_BEGIN}\nFrom `benchmarks/results/static/sass.md` ({stamp['date']}, Triton {stamp['triton']}, "
            f"commit {stamp['commit']}): {total} compiled candidates for sm_90a and sm_80, {verdict}. The attention "
            f"kernels on sm_90a, bf16 (loop instr. = instructions one unmasked iteration of the main loop executes):\n\n"
            f"{body}{README_END}")


def _stamp() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "torch": torch.__version__.split("+")[0],
            "commit": commit or "unknown"}


def merge_rows(previous: dict, rows: list[dict], stamp: dict, families: list[str]) -> tuple[list[dict], dict]:
    """The rows of this run, then those of `previous` (a sass.json) whose family this run did not
    compile; the stamp says which commit the kept rows come from."""
    kept = [r for r in previous.get("rows", []) if r.get("family") not in families]
    if kept:
        old = previous.get("stamp", {})
        stamp = {**stamp, "kept": f"{', '.join(sorted({r.get('family', '?') for r in kept}))} rows from commit "
                                  f"{old.get('commit', '?')} ({old.get('date', '?')}, Triton {old.get('triton', '?')})"}
        if old.get("note"):  # a remark about the kept rows stays with them
            stamp["note"] = old["note"]
    return kept + rows, stamp


def _nvcc_version() -> str:
    out = subprocess.run([os.environ.get("NVCC", "nvcc"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return f"nvcc {m.group(1)}" if m else "nvcc"


def update_readme(section: str, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if README_BEGIN not in text:
        raise SystemExit(f"{readme} has no {README_BEGIN} marker")
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + section + text[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="compiles in parallel")
    parser.add_argument("--only", choices=sorted(FAMILIES) + ["cuda"], action="append",
                        help="kernel families (default all; cuda: the csrc/cuda kernels through nvcc)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--readme", action="store_true", help="rewrite the README's static section")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the families not compiled now from the existing sass.json")
    parser.add_argument("--quick", action="store_true", help="bf16 only, attention head dims 64 and 128 (CI)")
    args = parser.parse_args(argv)
    # The kernel modules are imported below: they must define compiled kernels, not interpreted ones
    # (tests set TRITON_INTERPRET=1), and Triton 3.9 warns unless the fp-fusion default is explicit.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    families = args.only or [*FAMILIES, "cuda"]
    jobs = [j for family in families if family in FAMILIES for t in args.targets
            for j in FAMILIES[family](TARGETS[t], args.quick)]
    print(f"check-sass: {len(jobs)} compiles on {args.jobs} processes (Triton {triton.__version__})", flush=True)
    started, rows = time.time(), []
    if jobs:
        with ProcessPoolExecutor(args.jobs) as pool:
            for i, row in enumerate(pool.map(run_job, jobs), 1):
                rows.append(row)
                if i % 20 == 0 or i == len(jobs):
                    print(f"  {i}/{len(jobs)} compiled ({time.time() - started:.0f} s)", flush=True)
    stamp = _stamp()
    if "cuda" in families:
        cuda = cuda_check([TARGETS[t] for t in args.targets], args.jobs)
        if cuda is None:
            print("check-sass: no nvcc (set NVCC): the CUDA kernels were not checked", flush=True)
        else:
            rows += cuda
            stamp["nvcc"] = _nvcc_version()
            print(f"  {len(cuda)} CUDA kernels compiled ({time.time() - started:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge and (args.out / "sass.json").exists():
        rows, stamp = merge_rows(json.loads((args.out / "sass.json").read_text()), rows, stamp, families)
    (args.out / "sass.json").write_text(json.dumps({"stamp": stamp, "rows": rows}, indent=1) + "\n")
    (args.out / "sass.md").write_text(markdown(rows, stamp))
    if args.readme:
        update_readme(readme_section(rows, stamp))
    bad = failures(rows)
    for line in bad:
        print("FAIL", line)
    print(f"check-sass: {len(rows)} candidates, {len(bad)} failures, {time.time() - started:.0f} s; "
          f"table in {args.out / 'sass.md'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
