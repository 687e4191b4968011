"""The reference Transformer (decoder, encoder, encoder-decoder) and its byte-level data.

    from fastattn.models import ModelConfig, Transformer
    cfg = ModelConfig.preset("tiny", arch="decoder", attn_impl="fastattn", ffn_impl="fastattn", max_seq_len=T)
    model = Transformer(cfg)
    logits, loss = model(idx, targets)                 # decoder / encoder: idx, targets (B, T) int64
    logits, loss = model(idx, targets, source=src)     # encoder-decoder: src (B, S) feeds the encoder
"""

from fastattn.models.transformer import PRESETS, KVCache, ModelConfig, Transformer, sample_next

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer", "sample_next"]
