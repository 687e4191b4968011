"""Attention: forward, backward and forward+backward time, TFLOP/s and peak memory against sequence
length, per head dim and causal or not.

GPU: bf16, N 512..16k with B·N = 16k tokens and H·D = 2048 (flash-attention's benchmark shape).
CPU: fp32, B=1, H=8, D=64, N 256..2048 (what runs there in minutes).
Providers: fastattn's backends (forced with use_backend), the naive reference.py, torch SDPA per
backend (sdpa_kernel), FlexAttention (compiled, GPU), flash-attn and xformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Case,
    Context,
    Workload,
    attention_flops,
    fastattn_backend_reasons,
    forced_backend,
    gpu_only_reason,
    package_reason,
)

FAMILY = "attention"
TITLE = "Attention"
X_LABEL = "sequence length N (Nq = Nk)"
METRIC = "tflops"
MODES = ("fwd", "bwd", "fwd_bwd")
HEADLINE_MODE = "fwd_bwd"
BUDGET_S = {"cpu": 200, "cuda": 420}

SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
# Providers that take (B, N, H, D) tensors: built in that layout so no transpose is timed.
SEQUENCE_MAJOR = ("flash-attn", "xformers")


def cases(ctx: Context) -> list[Case]:
    lengths = ctx.pick(
        cpu=[256, 512, 1024, 2048],
        gpu=[512, 1024, 2048, 4096, 8192, 16384],
        quick_cpu=[256, 1024],
        quick_gpu=[1024, 4096, 16384],
        tiny=[32, 64],
    )
    head_dims = ctx.pick(cpu=[64], gpu=[64, 128], tiny=[16])
    out = []
    for head_dim in head_dims:
        for causal in (False, True):
            for n in lengths:
                batch = max(1, 16384 // n) if ctx.gpu else 1
                heads = 2048 // head_dim if ctx.gpu else ctx.pick(cpu=8, gpu=8, tiny=2)
                params = {"B": batch, "H": heads, "N": n, "D": head_dim, "causal": causal, "dtype": ctx.dtype}
                work = {m: attention_flops(batch, heads, n, n, head_dim, causal=causal, mode=m) for m in MODES}
                series = f"D={head_dim}, {'causal' if causal else 'non-causal'}"
                out.append(Case(series=series, x=n, params=params, work=work))
    return out


def providers(ctx: Context) -> dict[str, str | None]:
    """Every provider of this comparison: None if it may run here, else why not. Whether it runs a
    given case (dtype, head dim, device) is found by trying it."""
    reasons = dict(fastattn_backend_reasons(ctx))
    reasons["naive"] = None
    sdpa_reason = None if hasattr(torch.nn, "attention") else "torch.nn.attention.sdpa_kernel needs torch >= 2.3"
    reasons.update({name: sdpa_reason for name in SDPA_BACKENDS})
    if not ctx.gpu:  # torch has CPU kernels for flash and math only
        reasons["sdpa-efficient"] = sdpa_reason or "torch SDPA's memory-efficient kernel runs on CUDA only"
        reasons["sdpa-cudnn"] = sdpa_reason or "torch SDPA's cuDNN kernel runs on CUDA only"
    flex_cpu = "FlexAttention is measured compiled on the GPU only (a compile per shape exceeds the CPU time budget)"
    reasons["flex-attention"] = package_reason("torch.nn.attention.flex_attention", "torch>=2.5") or (
        None if ctx.gpu else flex_cpu
    )
    reasons["flash-attn"] = package_reason("flash_attn", "flash-attn") or gpu_only_reason(ctx, "flash-attn")
    reasons["xformers"] = package_reason("xformers")
    return reasons


def _make_qkv(params: dict, ctx: Context, sequence_major: bool):
    b, h, n, d = params["B"], params["H"], params["N"], params["D"]
    shape = (b, n, h, d) if sequence_major else (b, h, n, d)

    def make_inputs() -> dict:
        dtype = getattr(torch, params["dtype"])
        return {name: torch.randn(shape, device=ctx.device, dtype=dtype, requires_grad=True) for name in "qkv"}

    return make_inputs


_compiled_flex = None


def _flex_forward(params: dict, ctx: Context):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if params["causal"]:
        n = params["N"]
        block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, n, n, device=ctx.device)
    return lambda s: _compiled_flex(s["q"], s["k"], s["v"], block_mask=block_mask)


def _forward(provider: str, params: dict, ctx: Context):
    """The provider's attention as a function of the inputs dict."""
    causal = params["causal"]
    backend = forced_backend(provider)
    if backend is not None:
        import fastattn

        def run_fastattn(s):
            with fastattn.use_backend(backend):
                return fastattn.scaled_dot_product_attention(s["q"], s["k"], s["v"], is_causal=causal)

        return run_fastattn
    if provider == "naive":
        from fastattn import reference

        return lambda s: reference.attention(s["q"], s["k"], s["v"], is_causal=causal)
    if provider in SDPA_BACKENDS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = getattr(SDPBackend, SDPA_BACKENDS[provider])

        def run_sdpa(s):
            with sdpa_kernel(kernel):
                return F.scaled_dot_product_attention(s["q"], s["k"], s["v"], is_causal=causal)

        return run_sdpa
    if provider == "flex-attention":
        return _flex_forward(params, ctx)
    if provider == "flash-attn":
        from flash_attn import flash_attn_func

        return lambda s: flash_attn_func(s["q"], s["k"], s["v"], causal=causal)
    if provider == "xformers":
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None
        return lambda s: xops.memory_efficient_attention(s["q"], s["k"], s["v"], attn_bias=bias)
    raise ValueError(f"unknown attention provider {provider!r}")


def build(provider: str, params: dict, ctx: Context) -> Workload:
    forward = _forward(provider, params, ctx)
    return Workload(make_inputs=_make_qkv(params, ctx, provider in SEQUENCE_MAJOR), forward=forward)
