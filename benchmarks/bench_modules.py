"""A stack of torch nn.TransformerEncoderLayers before and after ``fastattn.patch(model)``:
forward+backward time (tokens/s) and peak memory against sequence length.

GPU: bf16, 4 layers of d_model 1024, 16 heads, FFN 4096, B·N = 16k tokens. CPU: fp32, 2 layers of
d_model 256, 4 heads, FFN 1024, B=1. Dropout is 0 so both models compute the same function.
Providers: the torch model, and its patched copy under automatic selection and each fastattn
backend forced.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from benchmarks.common import Case, Context, Workload, fastattn_backend_reasons, forced_backend

FAMILY = "modules"
TITLE = "nn.TransformerEncoderLayer stack, torch vs fastattn.patch"
X_LABEL = "sequence length N"
METRIC = "tokens"
MODES = ("fwd_bwd",)
HEADLINE_MODE = "fwd_bwd"
BUDGET_S = {"cpu": 60, "cuda": 150}


def _shape(ctx: Context) -> dict:
    return ctx.pick(
        cpu={"layers": 2, "d_model": 256, "heads": 4, "ffn": 1024},
        gpu={"layers": 4, "d_model": 1024, "heads": 16, "ffn": 4096},
        tiny={"layers": 1, "d_model": 32, "heads": 2, "ffn": 64},
    )


def cases(ctx: Context) -> list[Case]:
    shape = _shape(ctx)
    lengths = ctx.pick(
        cpu=[256, 512, 1024], gpu=[512, 1024, 2048, 4096, 8192], quick_cpu=[256], quick_gpu=[1024, 4096], tiny=[32]
    )
    series = f"{shape['layers']} layers, d_model {shape['d_model']}, {shape['heads']} heads"
    out = []
    for n in lengths:
        batch = max(1, 16384 // n) if ctx.gpu else 1
        params = {**shape, "B": batch, "N": n, "dtype": ctx.dtype}
        out.append(Case(series=series, x=n, params=params, work={m: float(batch * n) for m in MODES}))
    return out


def _patch_reason() -> str | None:
    try:
        import fastattn
    except ImportError as exc:
        return f"fastattn does not import: {exc}"
    if not hasattr(fastattn, "patch"):
        return "fastattn.patch is not available yet"
    return None


def providers(ctx: Context) -> dict[str, str | None]:
    reasons = {"torch": None}
    patch_reason = _patch_reason()
    reasons["fastattn-auto"] = patch_reason
    for name, reason in fastattn_backend_reasons(ctx).items():
        reasons[name] = patch_reason or reason
    return reasons


def _torch_model(params: dict) -> nn.Module:
    layers = [
        nn.TransformerEncoderLayer(
            params["d_model"], params["heads"], params["ffn"], dropout=0.0, batch_first=True
        )
        for _ in range(params["layers"])
    ]
    return nn.Sequential(*layers)


def build(provider: str, params: dict, ctx: Context) -> Workload:
    backend = forced_backend(provider)
    if provider not in ("torch", "fastattn-auto") and backend is None:
        raise ValueError(f"unknown modules provider {provider!r}; expected torch, fastattn-auto or fastattn-<backend>")
    import fastattn

    dtype = getattr(torch, params["dtype"])
    template = _torch_model(params)
    if provider != "torch":
        template = copy.deepcopy(template)
        fastattn.patch(template)

    def make_inputs() -> dict:
        model = copy.deepcopy(template).to(device=ctx.device, dtype=dtype).train()
        x = torch.randn(params["B"], params["N"], params["d_model"], device=ctx.device, dtype=dtype)
        return {"model": model, "x": x}

    def forward(s):
        if provider == "torch":
            return s["model"](s["x"])
        with fastattn.use_backend(backend):  # None: automatic selection
            return s["model"](s["x"])

    return Workload(make_inputs=make_inputs, forward=forward, max_copies=1)

