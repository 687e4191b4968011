"""Softmax along rows: GB/s (read + write of the tensors) against row length, 128 to 256k.

The total number of elements is fixed (2^26 on a GPU, 2^22 on the CPU), so long rows mean few
rows. Providers: fastattn's backends, torch.softmax, the naive max/exp/sum/divide (four unfused
passes) and Liger-Kernel's softmax when installed.
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    Case,
    Context,
    Workload,
    fastattn_backend_reasons,
    forced_backend,
    package_reason,
    softmax_bytes,
)

FAMILY = "softmax"
TITLE = "Softmax"
X_LABEL = "row length N"
METRIC = "gbps"
MODES = ("fwd", "bwd", "fwd_bwd")
HEADLINE_MODE = "fwd"
BUDGET_S = {"cpu": 60, "cuda": 120}


def cases(ctx: Context) -> list[Case]:
    total = ctx.pick(cpu=2**22, gpu=2**26, quick_cpu=2**20, tiny=2**12)
    lengths = ctx.pick(
        cpu=[128, 512, 2048, 8192, 32768, 131072, 262144],
        gpu=[2**p for p in range(7, 19)],
        quick_cpu=[128, 2048, 32768, 262144],
        quick_gpu=[128, 1024, 8192, 65536, 262144],
        tiny=[128, 1024],
    )
    element_size = torch.empty((), dtype=ctx.torch_dtype).element_size()
    out = []
    for n in lengths:
        rows = max(1, total // n)
        params = {"rows": rows, "N": n, "dtype": ctx.dtype}
        work = {m: softmax_bytes(rows, n, element_size, m) for m in MODES}
        out.append(Case(series="softmax", x=n, params=params, work=work))
    return out


def providers(ctx: Context) -> dict[str, str | None]:
    reasons = dict(fastattn_backend_reasons(ctx))
    reasons["torch"] = None
    reasons["naive"] = None
    reasons["liger"] = package_reason("liger_kernel", "liger-kernel")
    return reasons


def naive_softmax(x: torch.Tensor) -> torch.Tensor:
    """Four unfused passes, each reading (and most writing) the whole tensor."""
    exp = torch.exp(x - x.amax(dim=-1, keepdim=True))
    return exp / exp.sum(dim=-1, keepdim=True)


def _liger_softmax():
    try:
        from liger_kernel.ops.softmax import LigerSoftmaxFunction
    except ImportError:
        from liger_kernel.transformers.functional import liger_softmax

        return liger_softmax
    return LigerSoftmaxFunction.apply


def _forward(provider: str):
    backend = forced_backend(provider)
    if backend is not None:
        import fastattn

        def run_fastattn(s):
            with fastattn.use_backend(backend):
                return fastattn.softmax(s["x"], dim=-1)

        return run_fastattn
    if provider == "torch":
        return lambda s: torch.softmax(s["x"], dim=-1)
    if provider == "naive":
        return lambda s: naive_softmax(s["x"])
    if provider == "liger":
        liger_softmax = _liger_softmax()
        return lambda s: liger_softmax(s["x"])
    raise ValueError(f"unknown softmax provider {provider!r}")


def build(provider: str, params: dict, ctx: Context) -> Workload:
    forward = _forward(provider)

    def make_inputs() -> dict:
        dtype = getattr(torch, params["dtype"])
        x = torch.randn(params["rows"], params["N"], device=ctx.device, dtype=dtype, requires_grad=True)
        return {"x": x}

    return Workload(make_inputs=make_inputs, forward=forward)
