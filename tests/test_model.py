"""The reference Transformer (fastattn.models): configs, the op switch, KV-cache generation, sampling.

Numerics: the same weights run three ways, as the kernel tests do: the naive model (attn/ffn
"naive", fastattn.reference) in float64 is the oracle, the naive model in the test dtype is the
naive version, and the model on fastattn's kernels (each backend forced, and torch SDPA) must be
within k=2 of the naive error for the logits and the loss, k=3 for every parameter's gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
from helpers import DEVICE, INTERPRETING, assert_rule, backend_params

import fastattn
from fastattn import dispatch
from fastattn.models import PRESETS, KVCache, ModelConfig, Transformer, sample_next

MODEL_OPS = ("attention", "feed_forward", "layer_norm", "rms_norm")
B, T = 2, 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: torch's thread pool only adds contention on a shared 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backend_cases():
    """Every backend forced, each skipped with its reason when it cannot serve here or lacks an op."""
    params = []
    for param in backend_params("triton", "cpu", "cuda", "reference"):
        name, marks = param.values[0], list(param.marks)
        if not any(mark.name == "skip" for mark in marks):
            missing = [op for op in MODEL_OPS if not dispatch.has_kernels(name, op)]
            if missing:
                marks.append(pytest.mark.skip(reason=f"{name} has no {', '.join(missing)} kernel here yet"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def small_config(arch="decoder", **overrides) -> ModelConfig:
    """head dim 16 suits every kernel; one layer keeps the Triton interpreter quick."""
    base = dict(arch=arch, n_layer=1, d_model=32, n_head=2, max_seq_len=16, attn_impl="naive", ffn_impl="naive")
    return ModelConfig.preset("tiny", **{**base, **overrides})


def twin(model: Transformer, dtype=torch.float32, **cfg_overrides) -> Transformer:
    """The same weights under another config (implementation) and dtype."""
    other = Transformer(dataclasses.replace(model.config, **cfg_overrides))
    other.load_state_dict(model.state_dict())
    return other.to(device=DEVICE, dtype=dtype)


def random_batch(cfg: ModelConfig, batch=B, length=T):
    idx = torch.randint(0, 256, (batch, length), device=DEVICE)
    targets = torch.randint(0, 256, (batch, length), device=DEVICE)
    targets[0, :3] = -100  # some positions do not count (MLM-style)
    source = torch.randint(0, 256, (batch, length - 3), device=DEVICE) if cfg.arch == "encoder-decoder" else None
    return idx, targets, source


def run(model, batch, backend=None):
    """Logits, loss and parameter gradients (by name) of one forward/backward."""
    idx, targets, source = batch
    model.zero_grad(set_to_none=True)
    with fastattn.use_backend(backend) if backend else contextlib.nullcontext():
        logits, loss = model(idx, targets, source=source)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def assert_matches_oracle(model, fast_overrides, batch, backend=None, dtype=torch.float32):
    oracle = run(twin(model, torch.float64), batch)
    naive = run(twin(model, dtype), batch)
    try:
        fast = run(twin(model, dtype, **fast_overrides), batch, backend)
    except fastattn.BackendError as exc:
        pytest.skip(f"{exc}")
    assert_rule(fast[0], naive[0], oracle[0], k=2, name="logits", dtype=dtype)
    assert_rule(fast[1], naive[1], oracle[1], k=2, name="loss", dtype=dtype)
    assert fast[2].keys() == oracle[2].keys()
    for name in oracle[2]:
        assert_rule(fast[2][name], naive[2][name], oracle[2][name], k=3, name=f"grad {name}", dtype=dtype)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def test_presets_sizes():
    tiny = ModelConfig.preset("tiny")
    assert (tiny.n_layer, tiny.d_model, tiny.max_seq_len) == (2, 64, 64)
    assert Transformer(tiny).num_params() < 200_000
    gpt2 = Transformer(ModelConfig.preset("124m"))
    assert abs(gpt2.num_params() - 124.44e6) / 124.44e6 < 0.005  # GPT-2 small (50304-token vocabulary)
    assert set(PRESETS) == {"tiny", "small", "124m"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(arch="gpt"), "arch must be one of"),
        (dict(attn_impl="flash"), "attn_impl must be one of"),
        (dict(ffn_impl="sdpa"), "ffn_impl must be one of"),
        (dict(d_model=60, n_head=8), "multiple of n_head"),
        (dict(n_kv_head=3), "multiple of n_kv_head"),
        (dict(pos_encoding="rotary", d_model=6, n_head=2), "even head dim"),
        (dict(dropout=1.0), "dropout"),
        (dict(n_layer=0), "n_layer must be a positive int"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny", **kwargs)


def test_preset_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny, small, 124m"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field.*n_layers"):
        ModelConfig.preset("tiny", n_layers=3)


# --------------------------------------------------------------------------------------------
# structure and init
# --------------------------------------------------------------------------------------------


def test_tied_embeddings_share_one_tensor():
    tied = Transformer(ModelConfig.preset("tiny"))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.num_params() == sum(p.numel() for p in tied.parameters())  # counted once
    untied = Transformer(ModelConfig.preset("tiny", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() == tied.num_params() + untied.lm_head.weight.numel()


@pytest.mark.parametrize("preset, init_std", [("tiny", None), ("tiny", 0.02)])
def test_init_statistics_and_initial_loss(preset, init_std):
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, n_layer=4, init_std=init_std)
    model = Transformer(cfg)
    qkv = model.decoder[0].attn.qkv_proj.weight
    out = model.decoder[0].attn.out_proj.weight
    base = init_std or cfg.d_model**-0.5
    assert qkv.std().item() == pytest.approx(base, rel=0.05)
    assert out.std().item() == pytest.approx(base / math.sqrt(2 * cfg.n_layer), rel=0.1)  # residual writes scaled
    assert model.tok_emb.weight.std().item() == pytest.approx(init_std or 1.0, rel=0.05)
    # At init the model guesses: on random targets the loss is near ln(vocab), not far above it
    # (tied N(0, 1) embeddings favour the input token a little: ~0.9 nats above, measured).
    idx, targets = torch.randint(0, 256, (8, 32)), torch.randint(0, 256, (8, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 1.2


def test_post_norm_and_rmsnorm_build_and_train_step():
    for overrides in (
        dict(pre_norm=False),
        dict(norm="rmsnorm"),
        dict(activation="swiglu", bias=True),
        dict(activation="geglu_tanh"),
    ):
        cfg = ModelConfig.preset("tiny", **overrides)
        model = Transformer(cfg)
        idx = torch.randint(0, 256, (2, 8))
        _, loss = model(idx, idx)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_arch_argument_errors():
    idx = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="needs source="):
        Transformer(ModelConfig.preset("tiny", arch="encoder-decoder"))(idx, idx)
    with pytest.raises(ValueError, match="source= is for the encoder-decoder"):
        Transformer(ModelConfig.preset("tiny"))(idx, idx, source=idx)
    with pytest.raises(ValueError, match="longer than max_seq_len 8"):
        Transformer(ModelConfig.preset("tiny", max_seq_len=8))(torch.randint(0, 256, (1, 9)))
    with pytest.raises(ValueError, match="does not generate"):
        Transformer(ModelConfig.preset("tiny", arch="encoder")).generate(idx, 2)


@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder-decoder"])
def test_empty_batch_gives_empty_logits(arch):
    cfg = small_config(arch, attn_impl="fastattn", ffn_impl="fastattn")
    model = Transformer(cfg)
    idx = torch.randint(0, 256, (0, 5))
    logits, loss = model(idx, source=idx if arch == "encoder-decoder" else None)
    assert logits.shape == (0, 5, cfg.vocab_size) and loss is None


# --------------------------------------------------------------------------------------------
# the op switch: fastattn, sdpa and naive run the same weights to the same numbers
# --------------------------------------------------------------------------------------------

ARCH_CASES = {
    "decoder-learned": dict(arch="decoder"),
    "decoder-rotary-gqa": dict(arch="decoder", pos_encoding="rotary", n_kv_head=1, norm="rmsnorm"),
    "encoder-sinusoidal-postnorm": dict(arch="encoder", pos_encoding="sinusoidal", pre_norm=False, bias=True),
    "encoder-decoder": dict(arch="encoder-decoder", activation="swiglu"),
}


@pytest.mark.parametrize("backend", backend_cases())
@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_fastattn_model_matches_oracle(case, backend):
    if backend == "triton" and INTERPRETING and case not in ("decoder-learned", "encoder-decoder"):
        pytest.skip("the Triton interpreter is slow: two architectures reach every kernel path")
    torch.manual_seed(1)
    model = Transformer(small_config(**ARCH_CASES[case]))
    assert_matches_oracle(model, dict(attn_impl="fastattn", ffn_impl="fastattn"), random_batch(model.config), backend)


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_sdpa_model_matches_oracle(case):
    torch.manual_seed(2)
    model = Transformer(small_config(**ARCH_CASES[case]))
    assert_matches_oracle(model, dict(attn_impl="sdpa"), random_batch(model.config))


def test_fastattn_model_matches_oracle_in_bf16_autocast():
    """Under autocast the fastattn model's error stays within the numerics rule of the naive one's."""
    torch.manual_seed(3)
    model = Transformer(small_config("decoder"))
    batch = random_batch(model.config)
    oracle = run(twin(model, torch.float64), batch)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        naive = run(twin(model), batch)
        fast = run(twin(model, attn_impl="fastattn", ffn_impl="fastattn"), batch)
    assert fast[0].dtype == torch.bfloat16
    assert_rule(fast[0], naive[0], oracle[0], k=2, name="logits", dtype=torch.bfloat16)
    for name in oracle[2]:
        assert_rule(fast[2][name], naive[2][name], oracle[2][name], k=3, name=f"grad {name}", dtype=torch.bfloat16)


def test_dropout_is_random_in_training_and_off_in_eval():
    torch.manual_seed(4)
    model = Transformer(small_config(dropout=0.3, attn_impl="fastattn", ffn_impl="fastattn"))
    idx = torch.randint(0, 256, (2, 10))
    a, b = model(idx)[0], model(idx)[0]
    assert not torch.allclose(a, b)
    torch.manual_seed(5)
    c = model(idx)[0]
    torch.manual_seed(5)
    assert torch.equal(c, model(idx)[0])  # torch.manual_seed reproduces the masks
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


# --------------------------------------------------------------------------------------------
# KV cache and generation
# --------------------------------------------------------------------------------------------


def greedy_without_cache(model, idx, steps, source=None):
    """Greedy decoding by re-running the whole sequence each step: the reference for the cache."""
    for _ in range(steps):
        logits, _ = model(idx[:, -model.config.max_seq_len :], source=source)
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary"])
@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
@pytest.mark.parametrize("impl", ["fastattn", "naive"])
def test_cached_greedy_generation_equals_full_recompute(arch, pos, impl):
    torch.manual_seed(6)
    cfg = small_config(arch, pos_encoding=pos, n_layer=2, n_kv_head=1, attn_impl=impl, ffn_impl=impl, max_seq_len=24)
    model = Transformer(cfg).double().eval()  # float64: argmax ties cannot flip between the two paths
    prompt = torch.randint(0, 256, (2, 5))
    source = torch.randint(0, 256, (2, 7)) if arch == "encoder-decoder" else None
    cached = model.generate(prompt, 12, source=source, temperature=0)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 12, source))


@pytest.mark.parametrize("impl", ["fastattn", "sdpa", "naive"])
def test_chunked_prefill_uses_bottom_right_causal_mask(impl):
    """Feeding a sequence to the cache in chunks (n new queries after p cached keys) gives the
    logits of one full causal pass: the new queries see every cached key (not top-left causal)."""
    torch.manual_seed(7)
    cfg = small_config("decoder", pos_encoding="rotary", n_layer=2, attn_impl=impl, ffn_impl="naive" if impl == "sdpa" else impl)
    model = Transformer(cfg).double().eval()
    idx = torch.randint(0, 256, (2, 13))
    full, _ = model(idx)
    cache = KVCache(cfg.n_layer, cfg.max_seq_len)
    pieces = [model.logits(model._decode(idx[:, a:b], cache=cache)) for a, b in ((0, 5), (5, 6), (6, 13))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 13


def test_generation_past_max_seq_len_slides_the_window():
    torch.manual_seed(8)
    model = Transformer(small_config("decoder", max_seq_len=8)).double()
    prompt = torch.randint(0, 256, (1, 3))
    out = model.generate(prompt, 20, temperature=0)
    assert out.shape == (1, 23) and torch.equal(out[:, :3], prompt)
    # Up to the window's end the cache path is exact.
    assert torch.equal(out[:, :9], greedy_without_cache(model, prompt, 6))
    assert model.training  # generate() restores the mode it found


def test_generation_stops_at_eos():
    torch.manual_seed(9)
    model = Transformer(small_config("decoder"))
    vocab = model.config.vocab_size
    model.logits = lambda x: 10.0 * torch.nn.functional.one_hot(torch.full(x.shape[:-1], 7), vocab).float()
    out = model.generate(torch.randint(0, 256, (3, 4)), 10, eos_id=7, temperature=0)
    assert out.shape == (3, 5) and (out[:, 4] == 7).all()


def test_sample_next_greedy_top_k_top_p():
    torch.manual_seed(10)
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, top_k=1), logits.argmax(-1))
    gen = torch.Generator().manual_seed(0)
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(50):
        token = sample_next(logits, top_k=5, generator=gen)
        assert (top5 == token[:, None]).any(-1).all()
    # Nucleus: probabilities 0.5, 0.3, 0.15, 0.05 -> top_p 0.7 keeps {0, 1}, 0.5 keeps {0}.
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    draws = torch.stack([sample_next(probs.log(), top_p=0.7, generator=gen) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {1, 3}
    frac = (draws == 1).float().mean().item()
    assert abs(frac - 0.5 / 0.8) < 0.1  # renormalised within the nucleus
    assert set(torch.stack([sample_next(probs.log(), top_p=0.5, generator=gen) for _ in range(50)]).flatten().tolist()) == {1}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, temperature=-1)


def test_sampling_is_reproducible_with_a_generator():
    torch.manual_seed(11)
    model = Transformer(small_config("decoder"))
    prompt = torch.randint(0, 256, (2, 4))
    runs = [model.generate(prompt, 8, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*runs)


@pytest.mark.gpu
def test_gpu_bf16_model_matches_oracle_and_generates():
    torch.manual_seed(12)
    model = Transformer(ModelConfig.preset("tiny", attn_impl="naive", ffn_impl="naive", max_seq_len=128))
    batch = random_batch(model.config, batch=4, length=128)
    oracle = run(twin(model, torch.float64), batch)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        naive = run(twin(model), batch)
        fast = run(twin(model, attn_impl="fastattn", ffn_impl="fastattn"), batch)
    assert_rule(fast[0], naive[0], oracle[0], k=2, name="logits", dtype=torch.bfloat16)
    for name in oracle[2]:
        assert_rule(fast[2][name], naive[2][name], oracle[2][name], k=3, name=f"grad {name}", dtype=torch.bfloat16)
    fast_model = twin(model, attn_impl="fastattn", ffn_impl="fastattn")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fast_model.generate(batch[0][:, :10], 20, top_k=10)
    assert out.shape == (4, 30)


# --------------------------------------------------------------------------------------------
# static-shape decode steps (what generate(cuda_graph=True) captures and replays)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, overrides",
    [("decoder", dict(pos_encoding="rotary")), ("decoder", dict(pos_encoding="learned", n_kv_head=1)),
     ("decoder", dict(pos_encoding="sinusoidal")), ("encoder-decoder", {})],
    ids=["rotary", "learned_mqa", "sinusoidal", "encoder_decoder"],
)
def test_static_decode_steps_match_the_dynamic_cache(arch, overrides):
    """The static step (whole cache under a key mask, writes at a tensor position) gives the same
    greedy tokens as the growing cache, past a window restart too (max_seq_len 32, 40 new tokens)."""
    torch.manual_seed(21)
    model = Transformer(dataclasses.replace(small_config(arch), max_seq_len=32, **overrides)).eval()
    prompt = torch.randint(0, 256, (2, 5))
    source = torch.randint(0, 256, (2, 32)) if arch == "encoder-decoder" else None
    new = 20 if arch == "encoder-decoder" else 40
    dynamic = model.generate(prompt, new, temperature=0, source=source)
    static = model.generate(prompt, new, temperature=0, source=source, static_shapes=True)
    assert torch.equal(dynamic, static)


def test_cuda_graph_needs_cuda_tensors():
    model = Transformer(small_config("decoder"))
    with pytest.raises(ValueError, match="cuda_graph"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 4, cuda_graph=True)


@pytest.mark.gpu
def test_gpu_decode_in_a_cuda_graph_matches_eager(record_property):
    """A bf16 decode loop of the reference model on fastattn's kernels, replayed from a CUDA graph,
    gives the eager loop's tokens; tokens per second of both are recorded (junit properties)."""
    import time

    torch.manual_seed(22)
    cfg = ModelConfig.preset("tiny", attn_impl="fastattn", ffn_impl="fastattn", max_seq_len=256)
    model = Transformer(cfg).cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(0, 256, (4, 16), device="cuda")
    rates = {}
    outs = {}
    for mode in ("eager", "graph", "eager", "graph"):  # the second pass of each is timed (warm)
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs[mode] = model.generate(prompt, 128, temperature=0, cuda_graph=mode == "graph")
        torch.cuda.synchronize()
        rates[mode] = prompt.size(0) * 128 / (time.perf_counter() - start)
    assert torch.equal(outs["eager"], outs["graph"])
    for mode, rate in rates.items():
        record_property(f"decode_tokens_per_s_{mode}", round(rate, 1))
    print(f"decode tokens/s: eager {rates['eager']:.0f}, CUDA graph {rates['graph']:.0f}")
