"""fastattn's cpu kernels against torch's own op on the CPU: the speed ratio per op, size and dtype.

    python -m benchmarks.bench_cpu_ratio            # the sizes the family benchmarks measure, + small rows
    python -m benchmarks.bench_cpu_ratio --quick    # their quick sizes, shorter timings
    python -m benchmarks.bench_cpu_ratio --only softmax,layer_norm --dtypes float32 --merge

ratio = torch time / fastattn time: above 1 fastattn (under ``fastattn.use_backend("cpu")``) is
faster. Each (op, size, dtype, mode) times the two callables with ``cpu_time_interleaved``: rounds
of ~1 ms samples alternating between them, so that a change of load on the machine falls on both,
and the smallest round median of each. Unlike the family tables (whose cells sit on the scheduling
floor when the machine is busy, ~8 ms a call), nothing here waits for a scheduler: the inputs are
built once, the callables are warm, and the threads are fixed (``--threads``, default 2).

Ops: softmax and log_softmax (rows x cols), layer_norm, layer_norm with a residual (against
``x + r`` then ``F.layer_norm``), rms_norm (forward, no autograd graph), attention (B=1, H=8, d=64,
causal and not; forward and forward+backward, against ``F.scaled_dot_product_attention``), FFN gelu
512 -> 2048 -> 512 (forward and forward+backward, against two ``F.linear`` around ``F.gelu``; M=256
and 1024 tokens, bfloat16 M=256 only). Full run on the 2-core EPYC: about 4 minutes, most of it the
bfloat16 attention and FFN backward (torch's take seconds a call there).

Writes benchmarks/results/<device>/cpu_ratio.json, cpu_ratio.md and cpu_ratio.png (the ratios as
bars, a line at 1.0); prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    RESULTS_ROOT,
    collect_stamp,
    cpu_model_name,
    cpu_time_interleaved,
    device_slug,
    settle_garbage,
    stamp_line,
    write_json,
)

OPS = ("softmax", "log_softmax", "layer_norm", "layer_norm_residual", "rms_norm", "attention", "ffn")
DTYPES = ("float32", "bfloat16")
EPS = 1e-5


# ------------------------------------------------------------------------------------------------
# sizes: those of bench_softmax / bench_norm / bench_attention / bench_ffn on the CPU, plus small rows
# ------------------------------------------------------------------------------------------------


def softmax_sizes(quick: bool) -> list[tuple[int, int]]:
    total = 2**20 if quick else 2**22
    lengths = [128, 2048, 32768, 262144] if quick else [128, 512, 2048, 8192, 32768, 131072, 262144]
    sizes = [(4, 16), (64, 128), (256, 8192)] + [(max(1, total // n), n) for n in lengths]
    return list(dict.fromkeys(sizes))


def norm_sizes(quick: bool) -> list[tuple[int, int]]:
    hidden = [256, 4096] if quick else [256, 1024, 4096]
    return [(4, 16), (64, 128)] + [(2048, n) for n in hidden]


def attention_sizes(quick: bool) -> list[tuple[int, bool]]:
    return [(n, causal) for n in ([1024] if quick else [1024, 2048]) for causal in (False, True)]


def ffn_sizes(quick: bool, dtype: torch.dtype = torch.float32) -> list[int]:
    """bench_ffn's token counts; bfloat16 only the smallest: its GEMMs take seconds a call on a CPU
    without native bfloat16 arithmetic (6.5 s for M=256 forward+backward on the 2-core EPYC)."""
    return [256] if quick or dtype != torch.float32 else [256, 1024]


# ------------------------------------------------------------------------------------------------
# cases: (op, size label, mode, fastattn callable, torch callable)
# ------------------------------------------------------------------------------------------------


def _no_grad(fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            fn()

    return run


def _fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for t in leaves:
            t.grad = None
        fn().backward(grad)

    return run


def _with_cpu_backend(fn: Callable[[], object]) -> Callable[[], object]:
    import fastattn

    def run():
        with fastattn.use_backend("cpu"):
            return fn()

    return run


def build_cases(op: str, dtype: torch.dtype, quick: bool) -> list[dict]:
    import fastattn

    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0, requires_grad=False):
        t = (torch.randn(*shape, generator=g) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    cases = []
    if op in ("softmax", "log_softmax"):
        fa_fn = fastattn.log_softmax if op == "log_softmax" else fastattn.softmax
        th_fn = torch.log_softmax if op == "log_softmax" else torch.softmax
        for rows, cols in softmax_sizes(quick):
            x = randn(rows, cols)
            cases.append({"op": op, "size": f"{rows}x{cols}", "rows": rows, "cols": cols, "mode": "fwd",
                          "fastattn": _no_grad(_with_cpu_backend(lambda x=x: fa_fn(x, -1))),
                          "torch": _no_grad(lambda x=x: th_fn(x, -1))})
    elif op in ("layer_norm", "layer_norm_residual", "rms_norm"):
        for rows, cols in norm_sizes(quick):
            x, r = randn(rows, cols), randn(rows, cols)
            w, b = (1 + randn(cols, scale=0.1)).to(dtype), randn(cols, scale=0.1)
            shape = (cols,)
            if op == "layer_norm":
                fa = lambda x=x, w=w, b=b, s=shape: fastattn.layer_norm(x, s, w, b, EPS)  # noqa: E731
                th = lambda x=x, w=w, b=b, s=shape: F.layer_norm(x, s, w, b, EPS)  # noqa: E731
            elif op == "layer_norm_residual":
                fa = lambda x=x, r=r, w=w, b=b, s=shape: fastattn.layer_norm(x, s, w, b, EPS, residual=r)  # noqa: E731
                th = lambda x=x, r=r, w=w, b=b, s=shape: F.layer_norm(x + r, s, w, b, EPS)  # noqa: E731
            else:
                fa = lambda x=x, w=w, s=shape: fastattn.rms_norm(x, s, w, EPS)  # noqa: E731
                th = lambda x=x, w=w, s=shape: F.rms_norm(x, s, w, EPS)  # noqa: E731
            cases.append({"op": op, "size": f"{rows}x{cols}", "rows": rows, "cols": cols, "mode": "fwd",
                          "fastattn": _no_grad(_with_cpu_backend(fa)), "torch": _no_grad(th)})
    elif op == "attention":
        heads, head_dim = 8, 64
        for n, causal in attention_sizes(quick):
            q, k, v = (randn(1, heads, n, head_dim, requires_grad=True) for _ in range(3))
            grad = randn(1, heads, n, head_dim)
            fa = _with_cpu_backend(lambda q=q, k=k, v=v, c=causal: fastattn.scaled_dot_product_attention(
                q, k, v, is_causal=c))
            th = lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)  # noqa: E731
            label = f"N={n} d={head_dim}{' causal' if causal else ''}"
            common = {"op": "attention", "size": label, "rows": n, "cols": head_dim, "causal": causal}
            cases.append({**common, "mode": "fwd", "fastattn": _no_grad(fa), "torch": _no_grad(th)})
            cases.append({**common, "mode": "fwd_bwd", "fastattn": _fwd_bwd(fa, [q, k, v], grad),
                          "torch": _fwd_bwd(th, [q, k, v], grad)})
    elif op == "ffn":
        d_model, hidden = 512, 2048
        for m in ffn_sizes(quick, dtype):
            x = randn(m, d_model, requires_grad=True)
            w1 = randn(hidden, d_model, scale=1 / math.sqrt(d_model), requires_grad=True)
            b1 = randn(hidden, scale=0.1, requires_grad=True)
            w2 = randn(d_model, hidden, scale=1 / math.sqrt(hidden), requires_grad=True)
            b2 = randn(d_model, scale=0.1, requires_grad=True)
            grad = randn(m, d_model)
            leaves = [x, w1, b1, w2, b2]
            fa = _with_cpu_backend(lambda t=tuple(leaves): fastattn.feed_forward(*t, activation="gelu"))
            th = lambda t=tuple(leaves): F.linear(F.gelu(F.linear(t[0], t[1], t[2])), t[3], t[4])  # noqa: E731
            common = {"op": "ffn", "size": f"M={m} gelu {d_model}-{hidden}-{d_model}", "rows": m, "cols": d_model}
            cases.append({**common, "mode": "fwd", "fastattn": _no_grad(fa), "torch": _no_grad(th)})
            cases.append({**common, "mode": "fwd_bwd", "fastattn": _fwd_bwd(fa, leaves, grad),
                          "torch": _fwd_bwd(th, leaves, grad)})
    else:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    return cases


# ------------------------------------------------------------------------------------------------
# measuring and reporting
# ------------------------------------------------------------------------------------------------


def _timed_call(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(case: dict, total_s: float) -> dict:
    fa, th = case["fastattn"], case["torch"]
    # warm (thread pools, dispatch caches, lazy initialisation); the second call's time plans the
    # samples, so that a slow cell (seconds a call) costs four calls per provider, not six
    per_call = [_timed_call(fn) for fn in (fa, th)]
    if max(per_call) < 0.05:
        per_call = [_timed_call(fn) for fn in (fa, th)]
    fa_t, th_t = cpu_time_interleaved([fa, th], total_s, per_call_s=per_call)
    row = {k: v for k, v in case.items() if k not in ("fastattn", "torch")}
    row.update({"fastattn_ms": fa_t["time_ms"], "torch_ms": th_t["time_ms"],
                "fastattn_iqr_ms": fa_t["time_iqr_ms"], "torch_iqr_ms": th_t["time_iqr_ms"],
                "ratio": th_t["time_ms"] / fa_t["time_ms"]})
    return row


def _key(row: dict) -> tuple:
    return row["op"], row["size"], row["dtype"], row["mode"]


def _fmt_ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


def markdown(rows: list[dict], stamp: dict) -> str:
    lines = ["# fastattn cpu kernels vs torch on the CPU", "", stamp_line(stamp), "",
             "ratio = torch time / fastattn time (> 1: fastattn faster); interleaved timing "
             "(benchmarks/common.py `cpu_time_interleaved`), `python -m benchmarks.bench_cpu_ratio`.", "",
             "| op | size | dtype | mode | fastattn | torch | ratio |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        flag = " **<1**" if r["ratio"] < 1 else ""
        lines.append(f"| {r['op']} | {r['size']} | {r['dtype']} | {r['mode']} | {_fmt_ms(r['fastattn_ms'])} | "
                     f"{_fmt_ms(r['torch_ms'])} | {r['ratio']:.2f}{flag} |")
    losses = [r for r in rows if r["ratio"] < 1]
    lines += ["", f"{len(rows) - len(losses)} of {len(rows)} cells at least as fast as torch."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, stamp: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{r['op']} {r['size']} {r['dtype'].replace('float32', 'fp32').replace('bfloat16', 'bf16')}"
              + ("" if r["mode"] == "fwd" else f" {r['mode']}") for r in rows]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(10, 0.22 * len(rows)), 6))
    colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
    ax.bar(range(len(rows)), ratios, color=colors)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("torch time / fastattn time")
    ax.set_title(f"fastattn cpu vs torch, {stamp['device_name']}, {stamp['cpu_threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu_ratio", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the families' quick sizes, shorter timings")
    parser.add_argument("--only", default=",".join(OPS), help=f"comma-separated ops ({', '.join(OPS)})")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes (float32, bfloat16)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--time", type=float, help="seconds of timing per cell and provider (default 0.2, quick 0.08)")
    parser.add_argument("--out", type=Path, help="output directory (default benchmarks/results/<device>)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing cpu_ratio.json that this run does not measure")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.ops = [o.strip() for o in args.only.split(",") if o.strip()]
    bad = [o for o in args.ops if o not in OPS]
    if bad:
        parser.error(f"--only: unknown ops {bad}; expected some of {', '.join(OPS)}")
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtype_list if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {bad}; expected some of {', '.join(DTYPES)}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import fastattn
    from fastattn import dispatch

    reason = dispatch.backend_unavailable_reason("cpu", "cpu")
    if reason is not None:
        print(f"bench_cpu_ratio: the cpu backend is unavailable ({reason}); nothing to compare", file=sys.stderr)
        return 1
    del fastattn
    torch.set_num_threads(args.threads)
    total_s = args.time or (0.08 if args.quick else 0.2)
    stamp = collect_stamp("cpu")
    started = time.monotonic()
    rows = []
    for dtype_name in args.dtype_list:
        dtype = getattr(torch, dtype_name)
        for op in args.ops:
            for case in build_cases(op, dtype, args.quick):
                settle_garbage()
                row = measure(case, total_s)
                row["dtype"] = dtype_name
                rows.append(row)
                print(f"{row['op']:20s} {row['size']:24s} {dtype_name:9s} {row['mode']:8s} fastattn "
                      f"{_fmt_ms(row['fastattn_ms']):>10s} torch {_fmt_ms(row['torch_ms']):>10s} "
                      f"ratio {row['ratio']:.2f}", flush=True)
    stamp["other_runnable_tasks_after"] = collect_stamp("cpu")["other_runnable_tasks"]
    out = args.out or RESULTS_ROOT / device_slug(cpu_model_name(), "cpu")
    out.mkdir(parents=True, exist_ok=True)
    if args.merge and (out / "cpu_ratio.json").exists():
        measured = {_key(r) for r in rows}
        kept = [r for r in json.loads((out / "cpu_ratio.json").read_text()).get("rows", []) if _key(r) not in measured]
        rows = kept + rows
    data = {"benchmark": "cpu_ratio", "stamp": stamp, "threads": args.threads, "quick": args.quick,
            "timing_s_per_cell": total_s, "elapsed_s": round(time.monotonic() - started, 1), "rows": rows}
    write_json(out / "cpu_ratio.json", data)
    (out / "cpu_ratio.md").write_text(markdown(rows, stamp))
    if not args.no_plot and not plot(rows, out / "cpu_ratio.png", stamp):
        print("bench_cpu_ratio: matplotlib not installed, no plot", file=sys.stderr)
    losses = [r for r in rows if r["ratio"] < 1]
    print(f"{len(rows) - len(losses)} of {len(rows)} cells at least as fast as torch; wrote {out}/cpu_ratio.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
