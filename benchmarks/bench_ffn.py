"""The feed-forward block: forward, backward and full time, TFLOP/s and peak memory, GELU and SwiGLU.

GPU: bf16, d_model 4096 -> hidden 16384 -> 4096, 1k..8k tokens. CPU: fp32, 512 -> 2048 -> 512.
GELU blocks have biases (nn.Transformer style), SwiGLU blocks none (LLaMA style).
Providers: fastattn's backends (fastattn.feed_forward), the naive reference.py, torch's
nn.Linear -> act -> nn.Linear modules, and Liger-Kernel's SwiGLU MLP when installed.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn

from benchmarks.common import (
    Case,
    Context,
    Workload,
    fastattn_backend_reasons,
    ffn_flops,
    forced_backend,
    package_reason,
)

FAMILY = "ffn"
TITLE = "Feed-forward block"
X_LABEL = "tokens M"
METRIC = "tflops"
MODES = ("fwd", "bwd", "fwd_bwd")
HEADLINE_MODE = "fwd_bwd"
BUDGET_S = {"cpu": 60, "cuda": 150}
ACTIVATIONS = ("gelu", "swiglu")


def cases(ctx: Context) -> list[Case]:
    d_model, hidden = ctx.pick(cpu=(512, 2048), gpu=(4096, 16384), tiny=(32, 64))
    tokens = ctx.pick(
        cpu=[256, 1024], gpu=[1024, 2048, 4096, 8192], quick_cpu=[256], quick_gpu=[2048, 8192], tiny=[16, 32]
    )
    out = []
    for activation in ACTIVATIONS:
        gated = activation == "swiglu"
        for m in tokens:
            params = {"M": m, "d_model": d_model, "hidden": hidden, "activation": activation, "dtype": ctx.dtype}
            work = {mode: ffn_flops(m, d_model, hidden, gated=gated, mode=mode) for mode in MODES}
            out.append(Case(series=f"{activation} {d_model}->{hidden}->{d_model}", x=m, params=params, work=work))
    return out


def providers(ctx: Context) -> dict[str, str | None]:
    reasons = dict(fastattn_backend_reasons(ctx))
    reasons["naive"] = None
    reasons["torch"] = None
    reasons["liger"] = package_reason("liger_kernel", "liger-kernel")
    return reasons


class TorchSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with three bias-free nn.Linear, as LLaMA's MLP."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _module(provider: str, d_model: int, hidden: int, activation: str) -> nn.Module:
    if provider == "torch":
        if activation == "swiglu":
            return TorchSwiGLU(d_model, hidden)
        return nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
    if activation != "swiglu":
        raise NotImplementedError("Liger-Kernel has no plain (non-gated) GELU MLP")
    from liger_kernel.transformers import LigerSwiGLUMLP

    config = types.SimpleNamespace(hidden_size=d_model, intermediate_size=hidden, hidden_act="silu")
    return LigerSwiGLUMLP(config)


def _weights(params: dict, ctx: Context) -> dict:
    """fastattn's layout: w1 (hidden or 2·hidden gate-then-up, d_model), w2 (d_model, hidden)."""
    d_model, hidden, activation = params["d_model"], params["hidden"], params["activation"]
    dtype = getattr(torch, params["dtype"])
    rows = 2 * hidden if activation == "swiglu" else hidden
    bias = activation != "swiglu"

    def weight(*shape, fan_in):
        w = torch.randn(*shape, device=ctx.device, dtype=dtype) / math.sqrt(fan_in)
        return w.requires_grad_(True)

    return {
        "w1": weight(rows, d_model, fan_in=d_model),
        "b1": weight(rows, fan_in=d_model) if bias else None,
        "w2": weight(d_model, hidden, fan_in=hidden),
        "b2": weight(d_model, fan_in=hidden) if bias else None,
    }


def build(provider: str, params: dict, ctx: Context) -> Workload:
    dtype = getattr(torch, params["dtype"])
    activation = params["activation"]

    def make_x():
        return torch.randn(params["M"], params["d_model"], device=ctx.device, dtype=dtype)

    if provider in ("torch", "liger"):
        _module(provider, params["d_model"], params["hidden"], activation)  # fail early when unsupported

        def make_module_inputs() -> dict:
            module = _module(provider, params["d_model"], params["hidden"], activation)
            return {"mlp": module.to(device=ctx.device, dtype=dtype), "x": make_x()}

        return Workload(make_inputs=make_module_inputs, forward=lambda s: s["mlp"](s["x"]))

    backend = forced_backend(provider)
    if backend is None and provider != "naive":
        raise ValueError(f"unknown ffn provider {provider!r}")
    from fastattn import reference

    def forward(s):
        if provider == "naive":
            return reference.feed_forward(s["x"], s["w1"], s["b1"], s["w2"], s["b2"], activation)
        import fastattn

        with fastattn.use_backend(backend):
            return fastattn.feed_forward(s["x"], s["w1"], s["b1"], s["w2"], s["b2"], activation=activation)

    return Workload(make_inputs=lambda: {"x": make_x(), **_weights(params, ctx)}, forward=forward)
