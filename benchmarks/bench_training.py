"""End to end: tokens/s and peak memory of training steps of the reference Transformer
(``fastattn.models``) with naive, SDPA or fastattn attention and FFN.

GPU: the 124m preset, bf16 autocast, AdamW, 16k tokens per step, sequence 1k..8k.
CPU: the tiny preset in fp32, B=1, sequence 512..2048.
A training step is: zero grads, forward with loss, backward, optimizer step.
"""

from __future__ import annotations

import contextlib

import torch

from benchmarks.common import Case, Context, Workload

FAMILY = "training"
TITLE = "Training the reference Transformer"
X_LABEL = "sequence length T"
METRIC = "tokens"
MODES = ("step",)
HEADLINE_MODE = "step"
BUDGET_S = {"cpu": 90, "cuda": 240}

# provider -> (attn_impl, ffn_impl) of ModelConfig
IMPLS = {
    "naive": ("naive", "naive"),
    "sdpa": ("sdpa", "naive"),
    "fastattn": ("fastattn", "fastattn"),
}


def cases(ctx: Context) -> list[Case]:
    preset = ctx.pick(cpu="tiny", gpu="124m", tiny="tiny")
    lengths = ctx.pick(
        cpu=[512, 1024, 2048], gpu=[1024, 2048, 4096, 8192], quick_cpu=[512], quick_gpu=[1024, 4096], tiny=[32]
    )
    out = []
    for t in lengths:
        batch = max(1, 16384 // t) if ctx.gpu else 1
        params = {"preset": preset, "B": batch, "T": t, "dtype": ctx.dtype}
        out.append(Case(series=f"{preset} decoder", x=t, params=params, work={"step": float(batch * t)}))
    return out


def _models_reason() -> str | None:
    try:
        from fastattn.models import ModelConfig, Transformer  # noqa: F401
    except Exception as exc:
        return f"fastattn.models (ModelConfig, Transformer) is not available yet: {type(exc).__name__}: {exc}"[:300]
    return None


def providers(ctx: Context) -> dict[str, str | None]:
    reason = _models_reason()
    return dict.fromkeys(IMPLS, reason)


def build(provider: str, params: dict, ctx: Context) -> Workload:
    from fastattn.models import ModelConfig, Transformer

    if provider not in IMPLS:
        raise ValueError(f"unknown training provider {provider!r}; expected one of {', '.join(IMPLS)}")
    attn_impl, ffn_impl = IMPLS[provider]
    cfg = ModelConfig.preset(
        params["preset"], arch="decoder", attn_impl=attn_impl, ffn_impl=ffn_impl, max_seq_len=params["T"]
    )
    dtype = getattr(torch, params["dtype"])
    # bf16/fp16 via autocast over fp32 weights, as training does; fp32 runs plainly.
    autocast = dtype in (torch.bfloat16, torch.float16)

    def make_inputs() -> dict:
        model = Transformer(cfg).to(ctx.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        shape = (params["B"], params["T"])
        idx = torch.randint(0, cfg.vocab_size, shape, device=ctx.device)
        targets = torch.randint(0, cfg.vocab_size, shape, device=ctx.device)
        return {"model": model, "optimizer": optimizer, "idx": idx, "targets": targets}

    def loss_of(s):
        context = torch.autocast(ctx.device, dtype=dtype) if autocast else contextlib.nullcontext()
        with context:
            _, loss = s["model"](s["idx"], s["targets"])
        return loss

    def step(s):
        s["optimizer"].zero_grad(set_to_none=True)
        loss_of(s).backward()
        s["optimizer"].step()

    return Workload(make_inputs=make_inputs, forward=loss_of, step=step, max_copies=1)
