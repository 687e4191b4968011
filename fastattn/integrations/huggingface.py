"""fastattn as a Hugging Face transformers attention implementation.

    from fastattn.integrations.huggingface import register
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register())  # "fastattn"

``register()`` adds ``attention_forward`` to transformers' ``AttentionInterface`` (4.48+; transformers
stays optional: it is imported here only) and, where transformers builds masks per implementation
(4.53+), registers the SDPA mask builder for the same name, so the masks arrive as 4-D bool
(True = attend) tensors, None when causality alone suffices. Older versions hand in 4-D float
additive masks; both kinds are passed to ``fastattn.scaled_dot_product_attention`` as they are.

Contract (transformers' attention functions): ``fn(module, query (B, Hq, Nq, D), key (B, Hkv, Nk, D),
value (B, Hkv, Nk, Dv), attention_mask, scaling=None, dropout=0.0, **kwargs) -> (out (B, Nq, Hq, Dv),
None)``. GQA/MQA (Hkv < Hq) runs without repeating key/value. Causality follows transformers' SDPA
rule: ``is_causal`` (kwarg, else ``module.is_causal``) applies only with no mask and more than one
query; otherwise the mask carries it, except a padding-only (B, 1, 1, Nk) mask given to a causal
self-attention module (GPT-2 under transformers < 4.53), to which causality is added. Sliding windows are honoured through the mask transformers
builds for them; a window with no mask that could not cover the keys is refused, as are attention
logit soft-capping, attention sinks and paged caches. Attention weights are not returned
(``output_attentions=True`` gives None, as with "sdpa"). A query row whose keys are all masked
(left padding) gives zeros where eager gives a uniform average: those positions are padding.
"""

from __future__ import annotations

import warnings

import torch

from fastattn import functional

__all__ = ["NAME", "attention_forward", "register"]

NAME = "fastattn"
_MIN_VERSION = (4, 48)


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "fastattn.integrations.huggingface needs transformers>=4.48: pip install 'transformers>=4.48' "
            "(or fastattn[hf])"
        ) from exc
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit())
    if version < _MIN_VERSION:
        raise ImportError(f"fastattn needs transformers>=4.48 for custom attention, found {transformers.__version__}")
    return transformers


def register(name: str = NAME) -> str:
    """Register fastattn's attention (and, on 4.53+, the SDPA mask builder) under ``name``; returns
    ``name`` to pass as ``attn_implementation``. Idempotent."""
    _require_transformers()
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(name, attention_forward)
    except ImportError:  # 4.48-4.49: a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = attention_forward
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # before 4.53 every model builds its own masks
        return name
    # Without a mask builder registered for the name, transformers would pass no mask at all.
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name


def _refuse_unsupported(kwargs: dict) -> None:
    if kwargs.get("softcap") is not None:
        raise ValueError(
            "fastattn does not support attention logit soft-capping (softcap); use attn_implementation='eager'"
        )
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("fastattn does not support attention sinks (s_aux); use attn_implementation='eager'")
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        raise ValueError("fastattn does not support paged caches (continuous batching); use 'sdpa' or 'paged|eager'")


def _position_bias_mask(position_bias, mask, is_causal: bool, n_q: int, n_k: int):
    """A float mask carrying T5-style position biases (-inf where masked)."""
    if mask is None:
        if not is_causal:
            return position_bias
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=position_bias.device).tril()
        return position_bias.masked_fill(~causal, float("-inf"))
    if mask.dtype == torch.bool:
        return position_bias.masked_fill(~mask, float("-inf"))
    return position_bias + mask


def _is_causal_self_attention(module) -> bool:
    return bool(getattr(module, "is_causal", False)) and not getattr(module, "is_cross_attention", False)


def _add_causality(mask: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """A padding-only mask (..., 1, Nk) and causality (aligned bottom-right: the queries are the last
    Nq positions) as one (..., Nq, Nk) mask."""
    rows = torch.arange(n_q, device=mask.device)[:, None] + (n_k - n_q)
    causal = torch.arange(n_k, device=mask.device)[None, :] <= rows
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function contract, computed by fastattn (see the module docstring)."""
    _refuse_unsupported(kwargs)
    if kwargs.get("output_attentions", False):
        warnings.warn("fastattn attention does not return attention weights (output_attentions)", stacklevel=2)
    n_q, n_k = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is not None and mask.size(-1) > n_k:  # some versions build it for the whole cache
        mask = mask[..., :n_k]
    if mask is not None and mask.size(-2) == 1 < n_q and _is_causal_self_attention(module):
        # transformers < 4.53 hands GPT-2-style models a padding-only mask and leaves causality to
        # the attention (their eager code applies it): apply it here too.
        mask = _add_causality(mask, n_q, n_k)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(n_q > 1 and mask is None and causal)  # one query (decoding) sees every cached key
    window = kwargs.get("sliding_window")
    if window is not None and mask is None and n_k > window:
        raise ValueError(
            f"sliding_window={window} with {n_k} keys and no attention mask: fastattn applies sliding windows "
            "only through the mask transformers builds (register the implementation with fastattn's register())"
        )
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        mask, causal = _position_bias_mask(position_bias, mask, causal, n_q, n_k), False
    elif causal and n_k > n_q:  # top-left causal never reaches keys past n_q: leave them out
        key, value = key[:, :, :n_q], value[:, :, :n_q]
    out = functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=causal,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None
