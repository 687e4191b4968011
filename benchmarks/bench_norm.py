"""layer_norm and rms_norm: GB/s (read + write of the tensors) against hidden size.

GPU: bf16, 8192 rows, hidden 1024..16k. CPU: fp32, 2048 rows, hidden 256..4096.
Providers: fastattn's backends, torch (F.layer_norm, F.rms_norm), the naive unfused mean/var ops
and Liger-Kernel's LayerNorm / RMSNorm when installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Case,
    Context,
    Workload,
    fastattn_backend_reasons,
    forced_backend,
    norm_bytes,
    package_reason,
)

FAMILY = "norm"
TITLE = "Normalisation"
X_LABEL = "hidden size N"
METRIC = "gbps"
MODES = ("fwd", "bwd", "fwd_bwd")
HEADLINE_MODE = "fwd"
BUDGET_S = {"cpu": 50, "cuda": 90}
NORMS = ("layer_norm", "rms_norm")
EPS = 1e-5


def cases(ctx: Context) -> list[Case]:
    rows = ctx.pick(cpu=2048, gpu=8192, tiny=64)
    hidden = ctx.pick(
        cpu=[256, 1024, 4096],
        gpu=[1024, 2048, 4096, 8192, 16384],
        quick_cpu=[256, 4096],
        quick_gpu=[1024, 4096, 16384],
        tiny=[32, 64],
    )
    element_size = torch.empty((), dtype=ctx.torch_dtype).element_size()
    out = []
    for norm in NORMS:
        for n in hidden:
            params = {"norm": norm, "rows": rows, "N": n, "dtype": ctx.dtype}
            work = {m: norm_bytes(rows, n, element_size, m, has_bias=norm == "layer_norm") for m in MODES}
            out.append(Case(series=f"{norm}, {rows} rows", x=n, params=params, work=work))
    return out


def providers(ctx: Context) -> dict[str, str | None]:
    reasons = dict(fastattn_backend_reasons(ctx))
    reasons["torch"] = None
    reasons["naive"] = None
    reasons["liger"] = package_reason("liger_kernel", "liger-kernel")
    return reasons


def naive_layer_norm(x, weight, bias):
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + EPS) * weight + bias


def naive_rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPS) * weight


def _forward(provider: str, norm: str, n: int):
    backend = forced_backend(provider)
    layer = norm == "layer_norm"
    if backend is not None:
        import fastattn

        def run_fastattn(s):
            with fastattn.use_backend(backend):
                if layer:
                    return fastattn.layer_norm(s["x"], (n,), s["weight"], s["bias"], EPS)
                return fastattn.rms_norm(s["x"], (n,), s["weight"], EPS)

        return run_fastattn
    if provider == "torch":
        if layer:
            return lambda s: F.layer_norm(s["x"], (n,), s["weight"], s["bias"], EPS)
        return lambda s: F.rms_norm(s["x"], (n,), s["weight"], EPS)
    if provider == "naive":
        if layer:
            return lambda s: naive_layer_norm(s["x"], s["weight"], s["bias"])
        return lambda s: naive_rms_norm(s["x"], s["weight"])
    if provider == "liger":
        return lambda s: s["module"](s["x"])
    raise ValueError(f"unknown norm provider {provider!r}")


def _liger_module(norm: str, n: int) -> torch.nn.Module:
    if norm == "layer_norm":
        from liger_kernel.transformers import LigerLayerNorm

        return LigerLayerNorm(n, eps=EPS)
    from liger_kernel.transformers import LigerRMSNorm

    return LigerRMSNorm(n, eps=EPS)


def build(provider: str, params: dict, ctx: Context) -> Workload:
    norm, n = params["norm"], params["N"]
    forward = _forward(provider, norm, n)

    def make_inputs() -> dict:
        dtype = getattr(torch, params["dtype"])
        x = torch.randn(params["rows"], n, device=ctx.device, dtype=dtype, requires_grad=True)
        if provider == "liger":
            return {"x": x, "module": _liger_module(norm, n).to(device=ctx.device, dtype=dtype)}
        weight = (1 + 0.1 * torch.randn(n, device=ctx.device, dtype=dtype)).requires_grad_(True)
        bias = (0.1 * torch.randn(n, device=ctx.device, dtype=dtype)).requires_grad_(True)
        return {"x": x, "weight": weight, "bias": bias if norm == "layer_norm" else None}

    return Workload(make_inputs=make_inputs, forward=forward)
