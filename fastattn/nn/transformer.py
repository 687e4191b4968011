"""Drop-in ``TransformerEncoderLayer``, ``TransformerDecoderLayer``, ``TransformerEncoder``,
``TransformerDecoder`` and ``Transformer``.

Each subclasses the torch module it replaces and runs torch's own ``__init__`` (same arguments,
same random initialisation, same submodule names and state_dict keys), then turns the torch
submodules that ``__init__`` built into their fastattn twins (a class swap: no new state). Only
``forward`` differs:
- attention runs through ``fastattn.nn.MultiheadAttention`` (``fastattn.scaled_dot_product_attention``);
- the residual add is fused into the following LayerNorm (``fastattn.layer_norm(..., residual=)``);
- the FFN is one ``fastattn.feed_forward`` call when the activation is relu/gelu (as a string,
  ``F.relu``/``F.gelu``, or ``nn.ReLU``/``nn.GELU``/``nn.SiLU`` modules); any other callable runs
  torch's ``linear2(dropout(activation(linear1(x))))``.
The nested-tensor fast path of torch's encoder does not exist here: ``enable_nested_tensor`` and
``mask_check`` are accepted and ignored, and padded positions keep their (unused) values, as in
torch's training path. Masks and ``is_causal`` hints follow torch's rules.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastattn.nn.layers import apply_norm, feed_forward_block

__all__ = [
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]


def _adopt(module: torch.nn.Module) -> None:
    """Swap, in place, every torch module under ``module`` (itself excluded) that has a fastattn twin."""
    from fastattn.nn import TORCH_TWINS

    for child in module.modules():
        if child is not module and type(child) in TORCH_TWINS:
            child.__class__ = TORCH_TWINS[type(child)]


def _refuse_nested(**tensors) -> None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_nested:
            raise TypeError(
                f"{name} is a nested tensor; fastattn takes padded tensors with a key padding mask (a "
                "torch.nn.TransformerEncoder makes nested tensors in inference: use fastattn.nn.TransformerEncoder "
                "or fastattn.patch(model))"
            )


def _seq_len(x: torch.Tensor, batch_first: bool) -> int:
    if x.dim() == 2:  # unbatched (S, E)
        return x.size(0)
    return x.size(1 if batch_first else 0)


def _detect_causal(mask: torch.Tensor | None, is_causal: bool | None, size: int) -> bool:
    """torch's rule: an explicit hint wins; with none, the mask is causal when it equals
    generate_square_subsequent_mask(size) (float -inf above the diagonal, or bool True there)."""
    if is_causal is not None:
        return bool(is_causal)
    if mask is None or tuple(mask.shape) != (size, size):
        return False
    above = torch.ones(size, size, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, above))
    expected = torch.zeros(size, size, dtype=mask.dtype, device=mask.device).masked_fill(above, float("-inf"))
    return bool(torch.equal(mask, expected))


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """Drop-in ``torch.nn.TransformerEncoderLayer`` (see the module docstring)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation=F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first, bias,
            device, dtype,
        )  # fmt: skip
        _adopt(self)

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        _refuse_nested(src=src)
        x = src
        if self.norm_first:
            attended = self._sa_block(apply_norm(self.norm1, x), src_mask, src_key_padding_mask, is_causal)
            h, x = apply_norm(self.norm2, attended, residual=x)  # norm2(x + sa) and x + sa in one pass
            return x + self._ff_block(h)
        x, _ = apply_norm(self.norm1, x, residual=self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        x, _ = apply_norm(self.norm2, x, residual=self._ff_block(x))
        return x

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(feed_forward_block(x, self.linear1, self.activation, self.dropout, self.linear2))


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """Drop-in ``torch.nn.TransformerDecoderLayer`` (see the module docstring)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation=F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first, bias,
            device, dtype,
        )  # fmt: skip
        _adopt(self)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:
        _refuse_nested(tgt=tgt, memory=memory)
        x = tgt
        if self.norm_first:
            attended = self._sa_block(apply_norm(self.norm1, x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            h, x = apply_norm(self.norm2, attended, residual=x)
            crossed = self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            h, x = apply_norm(self.norm3, crossed, residual=x)
            return x + self._ff_block(h)
        attended = self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x, _ = apply_norm(self.norm1, x, residual=attended)
        crossed = self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x, _ = apply_norm(self.norm2, x, residual=crossed)
        x, _ = apply_norm(self.norm3, x, residual=self._ff_block(x))
        return x

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(feed_forward_block(x, self.linear1, self.activation, self.dropout, self.linear2))


class TransformerEncoder(torch.nn.TransformerEncoder):
    """Drop-in ``torch.nn.TransformerEncoder``: ``num_layers`` deep copies of ``encoder_layer``, run
    as fastattn layers (a torch layer passed in is copied, then swapped; the original is untouched)."""

    def __init__(
        self,
        encoder_layer: torch.nn.Module,
        num_layers: int,
        norm: torch.nn.Module | None = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ) -> None:
        with warnings.catch_warnings():  # torch's note on why it would not use nested tensors: moot here
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            super().__init__(encoder_layer, num_layers, norm, enable_nested_tensor, mask_check)
        _adopt(self.layers)

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        _refuse_nested(src=src)
        batch_first = self.layers[0].self_attn.batch_first
        is_causal = _detect_causal(mask, is_causal, _seq_len(src, batch_first))
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        return output if self.norm is None else apply_norm(self.norm, output)


class TransformerDecoder(torch.nn.TransformerDecoder):
    """Drop-in ``torch.nn.TransformerDecoder`` (layers are deep copies, run as fastattn layers)."""

    def __init__(self, decoder_layer: torch.nn.Module, num_layers: int, norm: torch.nn.Module | None = None) -> None:
        super().__init__(decoder_layer, num_layers, norm)
        _adopt(self.layers)

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:
        _refuse_nested(tgt=tgt, memory=memory)
        batch_first = self.layers[0].self_attn.batch_first
        tgt_is_causal = _detect_causal(tgt_mask, tgt_is_causal, _seq_len(tgt, batch_first))
        output = tgt
        for layer in self.layers:
            output = layer(
                output,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=tgt_is_causal,
                memory_is_causal=memory_is_causal,
            )
        return output if self.norm is None else apply_norm(self.norm, output)


class Transformer(torch.nn.Transformer):
    """Drop-in ``torch.nn.Transformer``. Its own encoder and decoder are fastattn's; a
    ``custom_encoder`` / ``custom_decoder`` is used as given (``fastattn.patch`` it if wanted).
    ``forward`` is torch's: it only checks shapes and calls the encoder and the decoder."""

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation=F.relu,
        custom_encoder=None,
        custom_decoder=None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            super().__init__(
                d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
                custom_encoder, custom_decoder, layer_norm_eps, batch_first, norm_first, bias, device, dtype,
            )  # fmt: skip
        if custom_encoder is None:
            self.encoder.__class__ = TransformerEncoder
            _adopt(self.encoder)
        if custom_decoder is None:
            self.decoder.__class__ = TransformerDecoder
            _adopt(self.decoder)
