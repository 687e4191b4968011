"""attn_implementation="fastattn" in Hugging Face transformers models built from tiny configs.

Each model is built three times from one seed: with "eager" attention in float32 (the naive
version), with torch's "sdpa" in float64 (the oracle: HF's eager attention gives NaN in float64
on fully padded rows, its min-value mask overflowing), and with "fastattn" in float32 on the
backend under test. Logits (at real, non-padding positions) follow the rule with k=2, the
gradients of every parameter with k=3.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from helpers import DEVICE, INTERPRETING, assert_rule
from test_nn import _one_thread, backend_cases, forced  # noqa: F401  (_one_thread: autouse fixture)

import fastattn
from fastattn.integrations import huggingface

transformers = pytest.importorskip("transformers")

VOCAB, BATCH, SEQ = 96, 2, 7
NAME = huggingface.register()


def _configs():
    return {
        "llama-gqa": transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA: two query heads per key/value head
            max_position_embeddings=64,
        ),
        "gpt2": transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        ),
        "bert": transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96
        ),
        "mistral-sliding-window": transformers.MistralConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,  # MQA
            sliding_window=3,
            max_position_embeddings=64,
        ),
    }


MODEL_CLASSES = {
    "llama-gqa": "LlamaForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bert": "BertModel",
    "mistral-sliding-window": "MistralForCausalLM",
}


VERSION = tuple(int(part) for part in transformers.__version__.split(".")[:2])


def skip_unless_custom_attention(model_id: str) -> None:
    """Models take a registered attention function only once their code goes through
    ALL_ATTENTION_FUNCTIONS (e.g. BERT not yet in transformers 4.48)."""
    module = sys.modules[getattr(transformers, MODEL_CLASSES[model_id]).__module__]
    if not hasattr(module, "ALL_ATTENTION_FUNCTIONS"):
        pytest.skip(f"{MODEL_CLASSES[model_id]} of transformers {transformers.__version__} takes no custom attention")


def in_float64(model_id: str, oracle_run):
    """The oracle's run; transformers < 4.53 builds some float64 masks through float32 and overflows."""
    try:
        return oracle_run()
    except RuntimeError as exc:
        if VERSION >= (4, 53) or "overflow" not in str(exc):
            raise
        pytest.skip(f"transformers {transformers.__version__} cannot run {model_id} in float64: {exc}")


def registered_attention(name: str):
    if hasattr(transformers, "AttentionInterface"):
        return transformers.AttentionInterface._global_mapping.get(name)
    return transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.get(name)


def build(model_id: str, implementation: str, dtype=torch.float32, seed: int = 0):
    config = _configs()[model_id]  # a fresh config per model: transformers writes the implementation into it
    torch.manual_seed(seed)
    model_class = getattr(transformers, MODEL_CLASSES[model_id])
    model = model_class._from_config(config, attn_implementation=implementation)
    return model.to(dtype).eval()  # eval: no dropout, so the three runs compute the same function


def batch(model_id: str):
    """Token ids and a 0/1 mask: left padding for decoders (as for generation), right for BERT."""
    ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if model_id == "bert":
        mask[1, -3:] = 0
    else:
        mask[1, :3] = 0
    return ids, mask


def _logits(output):
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def run(model, ids, mask, cotangent, device="cpu"):
    """Logits at the real positions, and every parameter's gradient of <logits, cotangent>."""
    model, ids, mask = model.to(device), ids.to(device), mask.to(device)
    logits = _logits(model(input_ids=ids, attention_mask=mask))[mask.bool()]
    (logits.double() * cotangent.to(device)).sum().backward()
    return logits, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def check_model(model_id: str, backend: str):
    skip_unless_custom_attention(model_id)
    ids, mask = batch(model_id)
    oracle_model = build(model_id, "sdpa", torch.float64)
    naive_model = build(model_id, "eager")
    fast_model = build(model_id, NAME)
    assert fast_model.config._attn_implementation == NAME
    width = _logits(oracle_model(input_ids=ids[:1, :1])).size(-1)
    cotangent = torch.randn(int(mask.sum()), width, dtype=torch.float64)
    oracle, oracle_grads = in_float64(model_id, lambda: run(oracle_model, ids, mask, cotangent))
    naive, naive_grads = run(naive_model, ids, mask, cotangent, DEVICE)
    with forced(backend):
        out, out_grads = run(fast_model, ids, mask, cotangent, DEVICE)
    assert_rule(out, naive, oracle, k=2, name=f"{model_id} logits")
    for name, grad in oracle_grads.items():
        if grad is None:  # e.g. BERT's pooler, GPT-2's unused position rows: none in either model
            assert out_grads[name] is None or not out_grads[name].any(), name
            continue
        assert_rule(out_grads[name], naive_grads[name], grad, k=3, name=f"{model_id} grad {name}")


MODEL_INTERPRETED = ("llama-gqa", "gpt2", "bert")  # the sliding-window model adds no kernel path


def _model_params():
    params = []
    for model_id in MODEL_CLASSES:
        for backend in backend_cases("attention"):
            if backend.id == "triton" and INTERPRETING and model_id not in MODEL_INTERPRETED:
                continue
            params.append(pytest.param(model_id, backend.values[0], marks=backend.marks, id=f"{model_id}-{backend.id}"))
    return params


@pytest.mark.parametrize("model_id, backend", _model_params())
def test_model_matches_eager(model_id, backend):
    check_model(model_id, backend)


def test_register_returns_the_name_and_is_idempotent():
    assert huggingface.register() == "fastattn" == NAME
    assert registered_attention(NAME) is huggingface.attention_forward
    assert huggingface.register("fastattn-alias") == "fastattn-alias"


def test_generation_matches_eager():
    """Greedy decoding with a KV cache and left padding: the prefill (mask, GQA) and the one-query
    steps (no causal flag, the cache's keys) pick the same tokens as eager."""
    ids, mask = batch("llama-gqa")
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = build("llama-gqa", "eager").generate(input_ids=ids, attention_mask=mask, **kwargs)
    generated = build("llama-gqa", NAME).generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(generated, expected)


# --------------------------------------------------------------------------------------------
# the attention function's contract, called directly
# --------------------------------------------------------------------------------------------


class FakeModule(torch.nn.Module):
    def __init__(self, is_causal: bool, groups: int = 1):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups


def _qkv(n_q=5, n_k=5, h_q=4, h_kv=2, d=16):
    return (
        torch.randn(BATCH, h_q, n_q, d, dtype=torch.float64),
        torch.randn(BATCH, h_kv, n_k, d, dtype=torch.float64),
        torch.randn(BATCH, h_kv, n_k, d, dtype=torch.float64),
    )


def _sdpa(q, k, v, **kwargs):
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs).transpose(1, 2)


def test_contract_causal_from_module_gqa_and_scaling():
    q, k, v = _qkv()
    out, weights = huggingface.attention_forward(FakeModule(True, 2), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (BATCH, 5, 4, 16) and out.is_contiguous()
    torch.testing.assert_close(out, _sdpa(q, k, v, is_causal=True, scale=0.3))
    out, _ = huggingface.attention_forward(FakeModule(True, 2), q, k, v, None, is_causal=False)
    torch.testing.assert_close(out, _sdpa(q, k, v))  # the is_causal kwarg wins over the module's


def test_contract_one_query_attends_every_cached_key():
    q, k, v = _qkv(n_q=1, n_k=6)
    out, _ = huggingface.attention_forward(FakeModule(True, 2), q, k, v, None)
    torch.testing.assert_close(out, _sdpa(q, k, v))


def test_contract_float_mask_as_older_transformers_build_it():
    """transformers < 4.53 (and eager-style builders) pass a 4-D additive mask with finfo.min."""
    q, k, v = _qkv(n_q=4, n_k=6)
    keep = torch.rand(BATCH, 1, 4, 6) > 0.3
    keep[..., 0] = True
    additive = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    longer = torch.cat([additive, torch.zeros(BATCH, 1, 4, 2, dtype=q.dtype)], dim=-1)  # built for a longer cache
    out, _ = huggingface.attention_forward(FakeModule(True, 2), q, k, v, longer)
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=keep))


@pytest.mark.parametrize("cross_attention", [False, True])
def test_contract_padding_only_mask_of_a_causal_module(cross_attention):
    """transformers < 4.53 gives GPT-2 a (B, 1, 1, Nk) padding mask and is_causal=False, leaving
    causality to the attention: it is added for self-attention (bottom-right: the queries are the
    last ones), not for cross-attention."""
    q, k, v = _qkv(n_q=4, n_k=6, h_kv=4)
    module = FakeModule(True)
    module.is_cross_attention = cross_attention
    keep = torch.ones(BATCH, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., :2] = False
    additive = torch.zeros(keep.shape, dtype=q.dtype).masked_fill(~keep, torch.finfo(q.dtype).min)
    out, _ = huggingface.attention_forward(module, q, k, v, additive, is_causal=False)
    if not cross_attention:
        keep = keep & torch.ones(4, 6, dtype=torch.bool).tril(diagonal=2)
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=keep))


def test_contract_position_bias():
    q, k, v = _qkv(h_kv=4)
    bias = torch.randn(1, 4, 5, 5, dtype=q.dtype)
    out, _ = huggingface.attention_forward(FakeModule(True), q, k, v, None, position_bias=bias)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(out, _sdpa(q, k, v, attn_mask=bias.masked_fill(~causal, float("-inf"))))


def test_contract_refusals():
    q, k, v = _qkv()
    module = FakeModule(True, 2)
    with pytest.raises(ValueError, match="sliding_window"):
        huggingface.attention_forward(module, q, k, v, None, sliding_window=3)
    huggingface.attention_forward(module, q, k, v, None, sliding_window=8)  # a window wider than the keys
    with pytest.raises(ValueError, match="softcap"):
        huggingface.attention_forward(module, q, k, v, None, softcap=30.0)
    with pytest.raises(ValueError, match="sinks"):
        huggingface.attention_forward(module, q, k, v, None, s_aux=torch.zeros(4))


def test_missing_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match="pip install"):
        huggingface.register()


def test_patch_switches_a_hugging_face_model():
    """fastattn.patch on a transformers model: attention through fastattn, nn.LayerNorm swapped;
    unpatch restores both. The logits follow the rule against eager."""
    ids, mask = batch("gpt2")
    oracle_model = build("gpt2", "sdpa", torch.float64)
    oracle = in_float64("gpt2", lambda: _logits(oracle_model(input_ids=ids, attention_mask=mask))[mask.bool()])
    model = build("gpt2", "eager")
    naive = _logits(model(input_ids=ids, attention_mask=mask))[mask.bool()]
    report = fastattn.patch(model)
    assert ("", f"attn_implementation 'eager' -> {NAME!r}") in report.swapped
    assert model.config._attn_implementation == NAME
    assert type(model.transformer.ln_f) is fastattn.nn.LayerNorm
    out = _logits(model(input_ids=ids, attention_mask=mask))[mask.bool()]
    assert_rule(out, naive, oracle, k=2)
    fastattn.unpatch(model)
    assert model.config._attn_implementation == "eager"
    assert type(model.transformer.ln_f) is torch.nn.LayerNorm
    assert torch.equal(_logits(model(input_ids=ids, attention_mask=mask))[mask.bool()], naive)


def test_copy_of_config_is_independent():
    """The test's own premise: building with one implementation does not switch another model."""
    first, second = build("gpt2", "eager"), build("gpt2", NAME)
    assert first.config._attn_implementation == "eager" and second.config._attn_implementation == NAME
    assert copy.deepcopy(second).config._attn_implementation == NAME
