"""The reference Transformer: one small, readable model in three shapes, nanoGPT-like.

- ``decoder``: GPT, a causal language model. ``model(idx, targets)`` with idx/targets (B, T).
- ``encoder``: BERT-style masked language model (bidirectional). ``model(idx, targets)``, targets -100
  where there is nothing to predict.
- ``encoder-decoder``: seq2seq with cross-attention. ``model(idx, targets, source=src)``: the encoder
  reads ``source`` (B, S), the decoder reads ``idx`` (B, T) causally and predicts ``targets`` (B, T).

Every op that fastattn accelerates goes through one small switch, so the same weights run on
fastattn's kernels (``"fastattn"``), on torch SDPA (``"sdpa"``, attention only) or on the plain
PyTorch version in ``fastattn.reference`` (``"naive"``): a difference in speed, memory or loss
between them is the kernels' alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastattn import functional, reference
from fastattn.reference import ACTIVATIONS, GATED_ACTIVATIONS

ARCHS = ("decoder", "encoder", "encoder-decoder")
ATTN_IMPLS = ("fastattn", "sdpa", "naive")
FFN_IMPLS = ("fastattn", "naive")
POS_ENCODINGS = ("learned", "sinusoidal", "rotary")
NORMS = ("layernorm", "rmsnorm")
IGNORE_INDEX = -100  # targets with this value do not count in the loss (F.cross_entropy's default)


@dataclass
class ModelConfig:
    arch: str = "decoder"  # "decoder" (GPT), "encoder" (BERT-style MLM) or "encoder-decoder" (seq2seq)
    vocab_size: int = 320  # byte-level: 256 bytes + 4 special tokens, padded to a multiple of 64
    max_seq_len: int = 64  # longest sequence (per side for encoder-decoder); sizes learned positions
    n_layer: int = 2  # blocks per stack (encoder-decoder: the encoder and the decoder each have n_layer)
    n_head: int = 2  # query heads
    n_kv_head: int | None = None  # key/value heads (GQA/MQA when fewer than n_head); None = n_head
    d_model: int = 64  # width of the residual stream
    d_ff: int | None = None  # FFN hidden width; None = 4·d_model (gated activations: 8/3·d_model, rounded to 64)
    activation: str = "gelu"  # relu, gelu, gelu_tanh, silu, swiglu, geglu, geglu_tanh
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    pre_norm: bool = True  # pre-norm (GPT-2) or post-norm (the original Transformer, BERT)
    pos_encoding: str = "learned"  # "learned", "sinusoidal" (fixed) or "rotary" (RoPE on q and k)
    rope_base: float = 10000.0
    bias: bool = False  # biases in the linear layers and LayerNorms (GPT-2 has them; without, small models learn faster)
    # Init. None: width-aware (linear weights N(0, 1/fan_in), embeddings N(0, 1), tied logits scaled
    # by 1/sqrt(d_model)); a float: GPT-2's scheme, every weight N(0, init_std²) (GPT-2: 0.02).
    init_std: float | None = None
    tie_embeddings: bool = True  # the output projection shares the token embedding's weight
    dropout: float = 0.0  # embeddings, attention weights, FFN activation and residual branches
    attn_impl: str = "fastattn"  # "fastattn", "sdpa" (torch) or "naive" (fastattn.reference)
    ffn_impl: str = "fastattn"  # "fastattn" or "naive"
    norm_impl: str | None = None  # "fastattn" or "naive"; None = as ffn_impl

    def __post_init__(self):
        def check_choice(name, choices):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

        check_choice("arch", ARCHS)
        check_choice("attn_impl", ATTN_IMPLS)
        check_choice("ffn_impl", FFN_IMPLS)
        check_choice("pos_encoding", POS_ENCODINGS)
        check_choice("norm", NORMS)
        check_choice("activation", ACTIVATIONS)
        if self.norm_impl is not None:
            check_choice("norm_impl", FFN_IMPLS)
        for name in ("vocab_size", "max_seq_len", "n_layer", "n_head", "d_model"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        if self.pos_encoding == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.activation in GATED_ACTIVATIONS:  # same parameter count as a 4·d ungated FFN
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    @property
    def norm_backend(self) -> str:
        return self.norm_impl or self.ffn_impl

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """A named size (``tiny``, ``small``, ``124m``) with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {', '.join(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {
    # CPU-sized: trains in seconds, what the tests use.
    "tiny": dict(n_layer=2, n_head=2, d_model=64, max_seq_len=64),
    # nanoGPT's character-level Shakespeare size (~10M parameters).
    "small": dict(n_layer=6, n_head=6, d_model=384, max_seq_len=256),
    # GPT-2 small: 124M parameters with GPT-2's vocabulary (50257 padded to 50304).
    "124m": dict(
        n_layer=12, n_head=12, d_model=768, max_seq_len=1024, vocab_size=50304, activation="gelu_tanh", bias=True, init_std=0.02
    ),
}


# --------------------------------------------------------------------------------------------
# the op switch: fastattn kernels, torch SDPA, or the plain PyTorch reference
# --------------------------------------------------------------------------------------------


def attend(impl, q, k, v, *, is_causal=False, attn_mask=None, dropout_p=0.0):
    """softmax(q·kᵀ/√d + mask)·v with torch SDPA's semantics, on the chosen implementation."""
    gqa = q.size(1) != k.size(1)
    if impl == "fastattn":
        return functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=gqa
        )
    if impl == "sdpa":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=gqa
        )
    return reference.attention(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa=gqa)


class Norm(nn.Module):
    """LayerNorm or RMSNorm; ``forward(x, residual)`` returns (norm(x + residual), x + residual),
    the residual add that fastattn fuses into the norm kernel."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.impl, self.eps = cfg.norm, cfg.norm_backend, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        use_bias = cfg.bias and cfg.norm == "layernorm"
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if use_bias else None

    def forward(self, x, residual=None):
        shape = (x.size(-1),)
        if self.kind == "layernorm":
            if self.impl == "fastattn":
                return functional.layer_norm(x, shape, self.weight, self.bias, self.eps, residual=residual)
            return reference.layer_norm(x, shape, self.weight, self.bias, self.eps, residual)
        if self.impl == "fastattn":
            return functional.rms_norm(x, shape, self.weight, self.eps, residual=residual)
        return reference.rms_norm(x, shape, self.weight, self.eps, residual)


class FeedForward(nn.Module):
    """act(x·W1ᵀ + b1)·W2ᵀ + b2, the two GEMMs and the activation fused by fastattn."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        gated = cfg.activation in GATED_ACTIVATIONS
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_hidden * (2 if gated else 1), bias=cfg.bias)
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=cfg.bias)
        self.fc2.is_residual_projection = True
        self.impl, self.activation, self.dropout = cfg.ffn_impl, cfg.activation, cfg.dropout

    def forward(self, x):
        p = self.dropout if self.training else 0.0
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        if self.impl == "fastattn":
            return functional.feed_forward(x, w1, b1, w2, b2, activation=self.activation, dropout_p=p)
        return reference.feed_forward(x, w1, b1, w2, b2, self.activation, p)


# --------------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------------


def sinusoidal_table(n_pos: int, dim: int, std: float = 1.0) -> torch.Tensor:
    """The original Transformer's fixed encoding (sin on even features, cos on odd ones), scaled
    to an RMS of ``std``, the token embeddings' init, so that neither drowns the other."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return (table * std * math.sqrt(2.0)).float()


def rotary_tables(n_pos: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (n_pos, head_dim/2) of RoPE's rotation angles pos·base^(-2i/head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + d/2) of x (B, H, T, d) by the angles of positions (T, d/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


# --------------------------------------------------------------------------------------------
# attention, blocks, KV cache
# --------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the tokens generated so far, per layer, preallocated to ``max_len``
    (allocated at the first write, in the dtype the keys have then, e.g. bf16 under autocast).
    ``cross`` holds each decoder layer's cross-attention keys/values of the encoder's output,
    computed once."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len, self.length = max_len, 0
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, Hkv, n, d) after the cached tokens; return all keys and values so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        self._allocate(layer, k, v)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def append_at(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Store one token's k, v (B, Hkv, 1, d) at position ``pos`` (a 0-dim int64 tensor on the
        cache's device); return the whole (B, Hkv, max_len, d) buffers. Shapes and addresses never
        change, so a decode step built on it can be captured in a CUDA graph (the attention masks
        the positions past ``pos``)."""
        self._allocate(layer, k, v)
        index = pos.reshape(1)
        self.keys[layer].index_copy_(2, index, k)
        self.values[layer].index_copy_(2, index, v)
        return self.keys[layer], self.values[layer]

    def _allocate(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.keys[layer] is None:  # zeros: a masked position must never hold a NaN (0 * NaN in p @ v)
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape[:3] + (v.size(3),))

    def reset(self):
        self.length = 0  # the buffers and the cross-attention keys stay


class Attention(nn.Module):
    """Multi-head attention: self-attention (fused q/k/v projection) or cross-attention (queries
    from x, keys/values from the encoder's output)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.cfg, self.cross = cfg, cross
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        if cross:
            self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=cfg.bias)
            self.kv_proj = nn.Linear(cfg.d_model, 2 * kv_dim, bias=cfg.bias)
        else:
            self.qkv_proj = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.bias)
        self.out_proj = nn.Linear(q_dim, cfg.d_model, bias=cfg.bias)
        self.out_proj.is_residual_projection = True

    def _heads(self, t: torch.Tensor, n_head: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, n_head, self.cfg.head_dim).transpose(1, 2)  # (B, H, n, d), a view

    def forward(self, x, memory=None, *, is_causal=False, attn_mask=None, rope=None, cache=None, layer=0, cache_pos=None):
        cfg = self.cfg
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        if self.cross:
            q = self._heads(self.q_proj(x), cfg.n_head)
            if cache is not None and cache.cross[layer] is not None:
                k, v = cache.cross[layer]
            else:
                k, v = (self._heads(t, cfg.kv_heads) for t in self.kv_proj(memory).split(kv_dim, dim=-1))
                if cache is not None:
                    cache.cross[layer] = (k, v)
        else:
            q, k, v = self.qkv_proj(x).split((q_dim, kv_dim, kv_dim), dim=-1)
            q, k, v = self._heads(q, cfg.n_head), self._heads(k, cfg.kv_heads), self._heads(v, cfg.kv_heads)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                k, v = cache.append(layer, k, v) if cache_pos is None else cache.append_at(layer, k, v, cache_pos)
        p = cfg.dropout if self.training else 0.0
        y = attend(cfg.attn_impl, q, k, v, is_causal=is_causal, attn_mask=attn_mask, dropout_p=p)
        return self.out_proj(y.transpose(1, 2).reshape(x.size(0), x.size(1), q_dim))


class Block(nn.Module):
    """Self-attention (+ cross-attention in the seq2seq decoder) and the FFN, each on a residual
    branch, pre-norm or post-norm."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.norm1, self.attn = Norm(cfg), Attention(cfg)
        self.norm_cross = Norm(cfg) if cross else None
        self.cross_attn = Attention(cfg, cross=True) if cross else None
        self.norm2, self.ffn = Norm(cfg), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, memory=None, *, is_causal=False, attn_mask=None, rope=None, cache=None, layer=0, cache_pos=None):
        def self_attn(h):
            return self.drop(self.attn(h, is_causal=is_causal, attn_mask=attn_mask, rope=rope, cache=cache, layer=layer,
                                       cache_pos=cache_pos))

        def cross_attn(h):
            return self.drop(self.cross_attn(h, memory, cache=cache, layer=layer))

        if self.pre_norm:  # x + f(norm(x)); each norm also takes the residual add: (norm(x + f), x + f)
            branch = self_attn(self.norm1(x))
            if self.cross_attn is not None:
                h, x = self.norm_cross(branch, residual=x)
                branch = cross_attn(h)
            h, x = self.norm2(branch, residual=x)
            return x + self.drop(self.ffn(h))
        x = self.norm1(self_attn(x), residual=x)[0]  # post-norm: norm(x + f(x))
        if self.cross_attn is not None:
            x = self.norm_cross(cross_attn(x), residual=x)[0]
        return self.norm2(self.drop(self.ffn(x)), residual=x)[0]


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        gpt2_init = cfg.init_std is not None
        self.embedding_std = cfg.init_std if gpt2_init else 1.0
        # Tied weights serve as N(0, 1) embeddings and as the output projection: 1/sqrt(d) keeps the
        # initial logits at unit scale (as T5 does). GPT-2's 0.02 init needs no scale.
        self.logit_scale = cfg.d_model**-0.5 if cfg.tie_embeddings and not gpt2_init else 1.0
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model, self.embedding_std), persistent=False)
        else:
            cos, sin = rotary_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        has_encoder, has_decoder = cfg.arch != "decoder", cfg.arch != "encoder"
        if has_encoder:
            self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        if has_decoder:
            cross = cfg.arch == "encoder-decoder"
            self.decoder = nn.ModuleList(Block(cfg, cross=cross) for _ in range(cfg.n_layer))
        # Pre-norm stacks end with a norm; post-norm blocks already end with one.
        if cfg.arch == "encoder-decoder":
            self.encoder_norm = Norm(cfg) if cfg.pre_norm else nn.Identity()
        self.final_norm = Norm(cfg) if cfg.pre_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self, module: nn.Module):
        """Linear weights N(0, 1/fan_in), embeddings N(0, 1), biases 0 (or GPT-2's N(0, init_std²));
        as in GPT-2, the projections that write into the residual stream are further scaled by
        1/sqrt(number of such writes), so the stream's variance does not grow with depth.

        GPT-2's fixed 0.02 suits d_model 768 but not d_model 64: there the embeddings (norm 0.16)
        are drowned by the first blocks' outputs, the positions with them, and a tiny
        encoder-decoder takes thousands of steps to learn to align its cross-attention."""
        cfg = self.config
        n_residual_writes = 2 * cfg.n_layer * (2 if cfg.arch == "encoder-decoder" else 1)
        if isinstance(module, nn.Linear):
            std = cfg.init_std if cfg.init_std is not None else module.in_features**-0.5
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(n_residual_writes)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.embedding_std)

    # ---- pieces -------------------------------------------------------------------------------

    def _embed(self, idx: torch.Tensor, offset: int = 0):
        """Token (+ absolute position) embeddings of idx (B, n) at positions offset..offset+n-1,
        and the rotary tables for those positions (None unless RoPE)."""
        n = idx.size(1)
        if offset + n > self.config.max_seq_len:
            raise ValueError(f"sequence of {offset + n} tokens is longer than max_seq_len {self.config.max_seq_len}")
        x = self.tok_emb(idx)
        rope = None
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb(torch.arange(offset, offset + n, device=idx.device))
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[offset : offset + n]
        else:
            rope = (self.rope_cos[offset : offset + n], self.rope_sin[offset : offset + n])
        return self.drop(x), rope

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.final_norm(x))
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits

    def encode(self, source: torch.Tensor) -> torch.Tensor:
        """The encoder's output (B, S, d_model): bidirectional self-attention over source (B, S)."""
        x, rope = self._embed(source)
        for block in self.encoder:
            x = block(x, rope=rope)
        return self.encoder_norm(x) if self.config.arch == "encoder-decoder" else x

    def _decode(self, idx, memory=None, cache: KVCache | None = None):
        """Causal decoder over idx (B, n), after the ``cache.length`` tokens already cached."""
        past = cache.length if cache is not None else 0
        n = idx.size(1)
        x, rope = self._embed(idx, offset=past)
        # Attention's causal flag is top-left aligned; with cached keys the n new queries sit at
        # the bottom-right of the (n, past + n) score matrix, hence an explicit mask when n > 1
        # (and none for n = 1: the one new token sees every cached key).
        is_causal, mask = past == 0 and n > 1, None
        if past > 0 and n > 1:
            mask = torch.ones(n, past + n, dtype=torch.bool, device=idx.device).tril(diagonal=past)
        for i, block in enumerate(self.decoder):
            x = block(x, memory, is_causal=is_causal, attn_mask=mask, rope=rope, cache=cache, layer=i)
        if cache is not None:
            cache.length += n
        return x

    def _decode_step(self, token: torch.Tensor, pos: torch.Tensor, memory, cache: KVCache) -> torch.Tensor:
        """One token (B, 1) at position ``pos`` (0-dim int64 tensor) with static shapes: every
        tensor's shape and address is the same at every step, nothing reads a value back on the
        host, so the step can be captured in a CUDA graph and replayed (``generate(cuda_graph=True)``).
        Attends to the whole cache under a key mask (positions <= pos); ``cache.length`` is the
        caller's to advance."""
        index = pos.reshape(1)
        x = self.tok_emb(token)
        rope = None
        if self.config.pos_encoding == "learned":
            x = x + self.pos_emb(index)
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table.index_select(0, index)
        else:
            rope = (self.rope_cos.index_select(0, index), self.rope_sin.index_select(0, index))
        x = self.drop(x)
        visible = (torch.arange(cache.max_len, device=token.device) <= pos).view(1, 1, 1, cache.max_len)
        for i, block in enumerate(self.decoder):
            x = block(x, memory, attn_mask=visible, rope=rope, cache=cache, layer=i, cache_pos=pos)
        return x

    def _step_runner(self, token: torch.Tensor, memory, cache: KVCache, cuda_graph: bool):
        """(step(token (B,), pos int) -> hidden (B, 1, d)): the static decode step, replayed from a
        CUDA graph when ``cuda_graph`` (captured here, after two warm-up steps on a side stream that
        also run any autotuning), else run eagerly."""
        static_token = token.new_zeros(token.size(0), 1)
        static_pos = torch.zeros((), dtype=torch.long, device=token.device)

        def eager(tok, pos):
            static_token.copy_(tok[:, None])
            static_pos.fill_(pos)
            return self._decode_step(static_token, static_pos, memory, cache)

        if not cuda_graph:
            return eager
        static_pos.fill_(cache.length)  # warm-up writes land where the first real step writes
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_step(static_token, static_pos, memory, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_hidden = self._decode_step(static_token, static_pos, memory, cache)

        def replay(tok, pos):
            static_token.copy_(tok[:, None])
            static_pos.fill_(pos)
            graph.replay()
            return static_hidden

        return replay

    # ---- training -----------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, source: torch.Tensor | None = None):
        """Logits (B, T, vocab) and the mean cross-entropy over targets != -100 (None without targets)."""
        arch = self.config.arch
        if arch == "encoder-decoder":
            if source is None:
                raise ValueError("the encoder-decoder model needs source=(B, S) token ids for its encoder")
            x = self._decode(idx, self.encode(source))
        elif source is not None:
            raise ValueError(f"source= is for the encoder-decoder model, not the {arch} model")
        elif arch == "encoder":
            x = self.encode(idx)
        else:
            x = self._decode(idx)
        logits = self.logits(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def configure_optimizer(self, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95), fused: bool | None = None):
        """AdamW with weight decay on the matrices (linear weights, embeddings) only: decaying
        biases and norm gains only pulls them toward a value that means nothing."""
        params = {id(p): p for p in self.parameters() if p.requires_grad}.values()  # tied weights once
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if hasattr(self, "pos_emb") else 0)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3× forward), as nanoGPT/PaLM count them:
        6 per weight of every matmul (the output projection included) + 12·layers·T·d for attention."""
        cfg = self.config
        matmul_weights = self.num_params(non_embedding=True) + self.lm_head.weight.numel()
        n_attn = cfg.n_layer * (3 if cfg.arch == "encoder-decoder" else 1)  # + decoder self & cross
        return 6.0 * matmul_weights + 12.0 * n_attn * seq_len * cfg.d_model

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        source: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        cuda_graph: bool = False,
        static_shapes: bool = False,
    ) -> torch.Tensor:
        """Continue idx (B, T0) by up to max_new_tokens tokens with a KV cache; (B, T0 + new).

        temperature 0 is greedy; otherwise sampling, optionally restricted to the top_k tokens
        and/or the nucleus of probability top_p. For the encoder-decoder, ``source`` feeds the
        encoder (once) and idx starts the decoder (e.g. the BOS token). Past max_seq_len the cache
        restarts from the last max_seq_len/2 tokens (a sliding window recomputed in one pass).
        Sequences stop after eos_id (later positions are filled with it).

        ``cuda_graph=True`` (CUDA tensors): each one-token step after the prompt is replayed from a
        CUDA graph captured once (static shapes: the step attends to the whole preallocated cache
        under a key mask), which removes the per-kernel launch and Python cost of a step.
        ``static_shapes=True`` runs that same static step eagerly (any device; what the graph
        replays)."""
        if self.config.arch == "encoder":
            raise ValueError("an encoder (masked LM) does not generate left to right; use a decoder checkpoint")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be (batch, length >= 1) token ids, got shape {tuple(idx.shape)}")
        if cuda_graph and idx.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model and idx on a CUDA device, got {idx.device}")
        was_training = self.training
        self.eval()
        try:
            memory = self.encode(source) if self.config.arch == "encoder-decoder" else None
            window = self.config.max_seq_len
            cache = KVCache(self.config.n_layer, window)
            out = idx
            hidden = self._decode(idx[:, -window:], memory, cache)
            step = None  # the static step (built at the first one-token step: the cache exists then)
            finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
            for _ in range(max_new_tokens):
                logits = self.logits(hidden[:, -1]).float()
                token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                if eos_id is not None:
                    token = token.masked_fill(finished, eos_id)
                    finished |= token == eos_id
                out = torch.cat((out, token[:, None]), dim=1)
                if eos_id is not None and bool(finished.all()):
                    break
                if cache.length == window:  # full: recompute the last half of the window
                    cache.reset()
                    hidden = self._decode(out[:, -(window // 2) :], memory, cache)
                elif cuda_graph or static_shapes:
                    step = step or self._step_runner(token, memory, cache, cuda_graph)
                    hidden = step(token, cache.length)
                    cache.length += 1
                else:
                    hidden = self._decode(token[:, None], memory, cache)
            return out
        finally:
            self.train(was_training)


def sample_next(logits, *, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """One token per row of logits (B, V): argmax when temperature is 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest and/or the smallest set of
    tokens whose probability reaches top_p (always at least the most likely token)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
