"""fastattn.nn modules against the torch modules they replace.

Every equivalence check runs three models from one state_dict: the torch module in float64 (the
oracle), the torch module in the test dtype (the naive version) and the fastattn module in the
test dtype, on the backend the dispatch picks ("auto") and on each backend forced. Outputs follow
the numerics rule with k=2, the gradient of every parameter and of every input tensor with k=3.
"""

from __future__ import annotations

import copy
import inspect
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, INTERPRETING, assert_rule, backend_params

import fastattn
import fastattn.nn as fnn
from fastattn import dispatch
from fastattn.reference import ACTIVATIONS, GATED_ACTIVATIONS, activate

E, H = 32, 2  # embed dim, heads: head dim 16 suits every kernel
N, L, S = 2, 5, 6  # batch, target length, source length


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: torch's thread pool only adds contention on a shared 2-core runner
    (a 15x slowdown measured under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backend_cases(*ops):
    """'auto' plus every backend forced, each skipped with its reason when it cannot serve here or
    lacks one of ``ops`` (e.g. while fastattn/triton/attention.py does not exist yet)."""
    params = [pytest.param("auto", id="auto")]
    for param in backend_params("triton", "cpu", "cuda", "reference"):
        name, marks = param.values[0], list(param.marks)
        if not any(mark.name == "skip" for mark in marks):
            missing = [op for op in ops if not dispatch.has_kernels(name, op)]
            if missing:
                marks.append(pytest.mark.skip(reason=f"{name} has no {', '.join(missing)} kernel here yet"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def cases_on_backends(cases: dict, ops, interpreted=None):
    """(case, backend) params: every case on every backend, except that under the Triton
    interpreter (slow) triton runs only the ``interpreted`` cases, chosen to reach each kernel path."""
    params = []
    for case_id, case in cases.items():
        for backend in backend_cases(*ops):
            if backend.id == "triton" and INTERPRETING and interpreted is not None and case_id not in interpreted:
                continue
            params.append(pytest.param(case, backend.values[0], marks=backend.marks, id=f"{case_id}-{backend.id}"))
    return params


LAYER_OPS = ("attention", "layer_norm", "feed_forward")


def forced(backend: str):
    return fastattn.use_backend(None if backend == "auto" else backend)


def _outputs(result) -> list[torch.Tensor]:
    return [r for r in result if r is not None] if isinstance(result, tuple) else [result]


def check_against_torch(torch_module, fast_module, args, kwargs=None, *, backend="auto", dtype=torch.float32):
    """The rule on outputs and on the gradients of every parameter and positional (input) tensor.
    Keyword tensors (masks) are cast but take no gradient. ``query is key`` identities survive.
    The oracle runs on the CPU, the naive and fastattn models on the test device."""
    kwargs = kwargs or {}
    fast_module.load_state_dict(torch_module.state_dict())
    runs = {
        "oracle": (copy.deepcopy(torch_module).double(), torch.float64, "cpu", nullcontext()),
        "naive": (copy.deepcopy(torch_module).to(DEVICE, dtype), dtype, DEVICE, nullcontext()),
        "fastattn": (copy.deepcopy(fast_module).to(DEVICE, dtype), dtype, DEVICE, forced(backend)),
    }
    cotangents, results = None, {}
    for role, (model, run_dtype, device, context) in runs.items():
        inputs: dict[int, torch.Tensor] = {}

        def cast(t, grad, run_dtype=run_dtype, device=device, inputs=inputs):
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) not in inputs:
                floating = t.is_floating_point()
                moved = t.detach().to(device, run_dtype if floating else t.dtype)
                inputs[id(t)] = moved.requires_grad_(grad and floating)
            return inputs[id(t)]

        run_args = [cast(t, True) for t in args]
        run_kwargs = {name: cast(t, False) for name, t in kwargs.items()}
        with context:
            outs = _outputs(model(*run_args, **run_kwargs))
        if cotangents is None:
            cotangents = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
        sum((o.double() * g.to(o.device)).sum() for o, g in zip(outs, cotangents)).backward()
        grads = {f"param {n}": p.grad for n, p in model.named_parameters()}
        grads.update(
            {f"input {i}": t.grad for i, t in enumerate(run_args) if isinstance(t, torch.Tensor) and t.requires_grad}
        )
        results[role] = (outs, grads)
    (oracle, oracle_grads), (naive, naive_grads), (out, out_grads) = (results[r] for r in runs)
    assert len(out) == len(oracle)
    for i, (o, n, r) in enumerate(zip(out, naive, oracle)):
        assert o.shape == r.shape, f"output {i}: shape {tuple(o.shape)} != torch's {tuple(r.shape)}"
        assert_rule(o, n, r, k=2, name=f"output {i}", dtype=dtype)
    for name, reference in oracle_grads.items():
        assert reference is not None, name
        assert out_grads[name] is not None, f"{name}: no gradient"
        assert_rule(out_grads[name], naive_grads[name], reference, k=3, name=f"grad {name}", dtype=dtype)


def random_bool_mask(*shape) -> torch.Tensor:
    """torch convention (True = masked out); column 0 is never masked, so no row is fully masked."""
    mask = torch.rand(*shape) < 0.3
    mask[..., 0] = False
    return mask


def random_float_mask(*shape) -> torch.Tensor:
    """An additive mask: random biases, -inf where a random bool mask says masked."""
    return torch.randn(*shape, dtype=torch.float64).masked_fill(random_bool_mask(*shape), float("-inf"))


def causal_float_mask(n: int) -> torch.Tensor:
    return torch.nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# MultiheadAttention
# --------------------------------------------------------------------------------------------


@dataclass
class MHACase:
    id: str
    ctor: dict = field(default_factory=dict)
    batch_first: bool = False
    batched: bool = True
    kind: str = "self"  # "self" (query is key is value), "kv" (key is value), "cross" (three tensors)
    attn_mask: str | None = None  # "2d-bool", "2d-float", "3d-bool", "3d-float", "causal"
    key_padding_mask: str | None = None  # "bool", "float"
    need_weights: bool = False
    average_attn_weights: bool = True
    is_causal: bool = False

    def build_inputs(self, module: torch.nn.MultiheadAttention):
        tgt_len = L
        src_len = L if self.kind == "self" else S
        lead = [] if not self.batched else ([N] if self.batch_first else [])
        trail = [] if not self.batched else ([] if self.batch_first else [N])

        def seq(length, width):
            return torch.randn(*lead, length, *trail, width, dtype=torch.float64)

        query = seq(tgt_len, E)
        if self.kind == "self":
            key = value = query
        elif self.kind == "kv":
            key = value = seq(src_len, module.kdim)
        else:
            key, value = seq(src_len, module.kdim), seq(src_len, module.vdim)
        kwargs = {"need_weights": self.need_weights, "average_attn_weights": self.average_attn_weights}
        batch = N if self.batched else 1
        mask_shapes = {"2d": (tgt_len, src_len), "3d": (batch * H, tgt_len, src_len)}
        if self.attn_mask == "causal":
            kwargs["attn_mask"] = causal_float_mask(tgt_len)
        elif self.attn_mask is not None:
            dims, kind = self.attn_mask.split("-")
            make = random_bool_mask if kind == "bool" else random_float_mask
            kwargs["attn_mask"] = make(*mask_shapes[dims])
        if self.key_padding_mask is not None:
            make = random_bool_mask if self.key_padding_mask == "bool" else random_float_mask
            kwargs["key_padding_mask"] = make(N, src_len) if self.batched else make(src_len)
        if self.is_causal:
            kwargs["is_causal"] = True
        return (query, key, value), kwargs


MHA_CASES = [
    MHACase("self"),
    MHACase("self-batch-first", batch_first=True),
    MHACase("weights-averaged", need_weights=True),
    MHACase("weights-per-head-kpm", need_weights=True, average_attn_weights=False, key_padding_mask="bool"),
    MHACase("attn2d-bool", attn_mask="2d-bool", batch_first=True),
    MHACase("attn2d-float", attn_mask="2d-float"),
    MHACase("attn3d-bool-kpm-bool", attn_mask="3d-bool", key_padding_mask="bool"),
    MHACase("attn3d-float-kpm-float", attn_mask="3d-float", key_padding_mask="float", batch_first=True),
    MHACase("attn-bool-kpm-float", attn_mask="2d-bool", key_padding_mask="float"),
    MHACase("kpm-float-weights", key_padding_mask="float", need_weights=True),
    MHACase("causal-hint", attn_mask="causal", is_causal=True, batch_first=True),
    MHACase("causal-hint-kpm", attn_mask="causal", is_causal=True, key_padding_mask="bool"),
    MHACase("causal-hint-weights", attn_mask="causal", is_causal=True, need_weights=True),
    MHACase("cross-kdim-vdim-nobias", ctor={"kdim": 24, "vdim": 16, "bias": False}, kind="cross", attn_mask="2d-bool"),
    MHACase("cross-kv-packed", kind="kv", key_padding_mask="bool", batch_first=True),
    MHACase("cross-three-tensors", kind="cross", need_weights=True, attn_mask="3d-float"),
    MHACase(
        "bias-kv-zero-attn",
        ctor={"add_bias_kv": True, "add_zero_attn": True},
        kind="cross",
        attn_mask="2d-bool",
        key_padding_mask="bool",
    ),
    MHACase(
        "bias-kv-zero-attn-weights",
        ctor={"add_bias_kv": True, "add_zero_attn": True},
        attn_mask="3d-float",
        need_weights=True,
        average_attn_weights=False,
    ),
    MHACase("bias-kv-causal-hint", ctor={"add_bias_kv": True}, attn_mask="causal", is_causal=True),
    MHACase("unbatched", batched=False, attn_mask="3d-bool", key_padding_mask="bool"),
    MHACase("unbatched-weights", batched=False, kind="cross", need_weights=True, attn_mask="2d-float"),
]


MHA_INTERPRETED = (
    "weights-per-head-kpm",
    "attn3d-float-kpm-float",
    "attn-bool-kpm-float",
    "causal-hint",
    "cross-kdim-vdim-nobias",
    "bias-kv-zero-attn",
    "unbatched",
)


@pytest.mark.parametrize(
    "case, backend",
    cases_on_backends({c.id: c for c in MHA_CASES}, ("attention", "softmax"), MHA_INTERPRETED),
)
def test_multihead_attention_matches_torch(case, backend):
    ctor = {"batch_first": case.batch_first, **case.ctor}
    reference = torch.nn.MultiheadAttention(E, H, **ctor)
    args, kwargs = case.build_inputs(reference)
    check_against_torch(reference, fnn.MultiheadAttention(E, H, **ctor), args, kwargs, backend=backend)


def test_multihead_attention_eval_mode_ignores_dropout():
    reference = torch.nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True).eval()
    fast = fnn.MultiheadAttention(E, H, dropout=0.5, batch_first=True).eval()
    x = torch.randn(N, L, E, dtype=torch.float64)
    check_against_torch(reference, fast, (x, x, x), {"need_weights": False})


def test_multihead_attention_fully_masked_rows_give_zeros():
    """A batch item whose keys are all padding attends to nothing: zeros before out_proj (torch: NaN)."""
    mha = fnn.MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E, requires_grad=True)
    key_padding_mask = torch.zeros(N, L, dtype=torch.bool)
    key_padding_mask[1] = True
    for need_weights in (False, True):
        out, weights = mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=need_weights)
        assert torch.equal(out[1], mha.out_proj.bias.detach().expand(L, E))
        assert torch.isfinite(out).all()
        if need_weights:
            assert torch.equal(weights[1], torch.zeros(L, L))
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(grad).all()


def test_multihead_attention_dropout_on_returned_weights():
    """In training, the returned weights are the dropped-out ones: each is 0 or its eval value / (1 - p)."""
    p = 0.4
    mha = fnn.MultiheadAttention(E, H, dropout=p, batch_first=True)
    x = torch.randn(N, L, E)
    _, kept = mha.eval()(x, x, x, average_attn_weights=False)
    _, dropped = mha.train()(x, x, x, average_attn_weights=False)
    is_zero = dropped == 0
    assert 0.2 < is_zero.float().mean().item() < 0.6
    torch.testing.assert_close(dropped[~is_zero], (kept / (1 - p))[~is_zero])


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_dropout_is_unbiased_and_seeded(need_weights):
    """Dropout on the attention weights: reproducible under torch.manual_seed, different per draw,
    and its mean over many draws is the eval-mode output (out_proj is linear)."""
    mha = fnn.MultiheadAttention(E, H, dropout=0.3, batch_first=True)
    x = torch.randn(1, L, E)
    with torch.no_grad():
        expected = mha.eval()(x, x, x, need_weights=need_weights)[0]
        mha.train()
        torch.manual_seed(1)
        first = mha(x, x, x, need_weights=need_weights)[0]
        torch.manual_seed(1)
        again = mha(x, x, x, need_weights=need_weights)[0]
        draws = torch.stack([mha(x, x, x, need_weights=need_weights)[0] for _ in range(400)])
    assert torch.equal(first, again)
    assert not torch.equal(draws[0], draws[1])
    single_err = (draws - expected).abs().amax(dim=(1, 2, 3)).mean()
    mean_err = (draws.mean(0) - expected).abs().max()
    assert mean_err < single_err / 5, (mean_err, single_err)


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_empty_inputs(need_weights):
    mha = fnn.MultiheadAttention(E, H, batch_first=True)
    out, weights = mha(torch.randn(N, 0, E), torch.randn(N, S, E), torch.randn(N, S, E), need_weights=need_weights)
    assert out.shape == (N, 0, E)
    if need_weights:
        assert weights.shape == (N, 0, S)
    out, _ = mha(torch.randn(0, L, E), torch.randn(0, S, E), torch.randn(0, S, E), need_weights=need_weights)
    assert out.shape == (0, L, E)


def test_layers_empty_inputs():
    encoder = fnn.TransformerEncoderLayer(**_layer_kwargs(batch_first=True))
    decoder = fnn.TransformerDecoderLayer(**_layer_kwargs(batch_first=True, norm_first=True))
    assert encoder(torch.randn(N, 0, E)).shape == (N, 0, E)
    assert encoder(torch.randn(0, L, E)).shape == (0, L, E)
    assert decoder(torch.randn(N, 0, E), torch.randn(N, S, E)).shape == (N, 0, E)
    out = decoder(torch.randn(N, L, E), torch.randn(N, 0, E))  # no memory: cross-attention gives zeros
    assert out.shape == (N, L, E) and torch.isfinite(out).all()
    assert fnn.FeedForward(E, 48)(torch.randn(0, E)).shape == (0, E)
    assert fnn.RMSNorm(E)(torch.randn(0, E)).shape == (0, E)


def test_multihead_attention_bad_arguments():
    mha = fnn.MultiheadAttention(E, H)
    x = torch.randn(L, N, E)
    with pytest.raises(ValueError, match="is_causal"):
        mha(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(N, L, L, dtype=torch.bool))  # must be N·num_heads
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(L, N, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="query"):
        mha(torch.randn(L, N, E + 1), x, x)
    with pytest.raises(ValueError, match="query"):
        mha(torch.randn(N, L, H, E), x, x)
    with pytest.raises(TypeError, match="nested"):
        nested = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(4, E)])
        mha(nested, nested, nested)


# --------------------------------------------------------------------------------------------
# Transformer layers and stacks
# --------------------------------------------------------------------------------------------


def _seq(length, batch_first, batched=True, width=E):
    if not batched:
        return torch.randn(length, width, dtype=torch.float64)
    return torch.randn(*((N, length) if batch_first else (length, N)), width, dtype=torch.float64)


def _layer_kwargs(**overrides):
    return {"d_model": E, "nhead": H, "dim_feedforward": 64, "dropout": 0.0, **overrides}


ENCODER_MASKS = {
    "none": lambda: {},
    "causal-hint": lambda: {"src_mask": causal_float_mask(L), "is_causal": True},
    "mask-and-padding": lambda: {"src_mask": random_bool_mask(L, L), "src_key_padding_mask": random_bool_mask(N, L)},
}


ENCODER_CASES = {
    f"{'pre' if norm_first else 'post'}-norm-{'batch' if batch_first else 'seq'}-first-{masks}": (
        norm_first,
        batch_first,
        masks,
    )
    for norm_first in (False, True)
    for batch_first in (False, True)
    for masks in ENCODER_MASKS
}
ENCODER_INTERPRETED = (
    "post-norm-seq-first-mask-and-padding",
    "pre-norm-batch-first-causal-hint",
    "pre-norm-seq-first-none",
)


@pytest.mark.parametrize("case, backend", cases_on_backends(ENCODER_CASES, LAYER_OPS, ENCODER_INTERPRETED))
def test_encoder_layer_matches_torch(case, backend):
    norm_first, batch_first, masks = case
    kwargs = _layer_kwargs(norm_first=norm_first, batch_first=batch_first)
    check_against_torch(
        torch.nn.TransformerEncoderLayer(**kwargs),
        fnn.TransformerEncoderLayer(**kwargs),
        (_seq(L, batch_first),),
        ENCODER_MASKS[masks](),
        backend=backend,
    )


ACTIVATION_CASES = {
    "relu-str": "relu",
    "gelu-str": "gelu",
    "F.gelu": F.gelu,
    "nn.ReLU": torch.nn.ReLU(),
    "nn.GELU-tanh": torch.nn.GELU(approximate="tanh"),
    "nn.SiLU": torch.nn.SiLU(),
    "custom-callable": lambda x: x * torch.sigmoid(1.702 * x),  # no fused kernel: torch's FFN path
}


@pytest.mark.parametrize("activation", list(ACTIVATION_CASES))
def test_encoder_layer_activations(activation):
    kwargs = _layer_kwargs(activation=ACTIVATION_CASES[activation], norm_first=activation.endswith("str"))
    x = _seq(L, False)
    check_against_torch(torch.nn.TransformerEncoderLayer(**kwargs), fnn.TransformerEncoderLayer(**kwargs), (x,))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_no_bias_unbatched_eps(norm_first):
    kwargs = _layer_kwargs(bias=False, layer_norm_eps=1e-3, norm_first=norm_first)
    masks = {"src_key_padding_mask": random_bool_mask(L)}
    layers = torch.nn.TransformerEncoderLayer(**kwargs), fnn.TransformerEncoderLayer(**kwargs)
    check_against_torch(*layers, (_seq(L, False, batched=False),), masks)


DECODER_CASES = {
    f"{'pre' if norm_first else 'post'}-norm-{'batch' if batch_first else 'seq'}-first": (norm_first, batch_first)
    for norm_first in (False, True)
    for batch_first in (False, True)
}


@pytest.mark.parametrize("case, backend", cases_on_backends(DECODER_CASES, LAYER_OPS, ("pre-norm-batch-first",)))
def test_decoder_layer_matches_torch(case, backend):
    norm_first, batch_first = case
    kwargs = _layer_kwargs(norm_first=norm_first, batch_first=batch_first, activation="gelu")
    masks = {
        "tgt_mask": causal_float_mask(L),
        "tgt_is_causal": True,
        "memory_mask": random_float_mask(L, S),
        "tgt_key_padding_mask": random_bool_mask(N, L),
        "memory_key_padding_mask": random_bool_mask(N, S),
    }
    check_against_torch(
        torch.nn.TransformerDecoderLayer(**kwargs),
        fnn.TransformerDecoderLayer(**kwargs),
        (_seq(L, batch_first), _seq(S, batch_first)),
        masks,
        backend=backend,
    )


# The stacks add only mask detection and the final norm to the layers: no extra interpreter run.
@pytest.mark.parametrize(
    "batch_first, backend", cases_on_backends({"seq-first": False, "batch-first": True}, LAYER_OPS, ())
)
def test_encoder_stack_detects_causal_mask(batch_first, backend):
    """TransformerEncoder with a final norm; a causal mask without the hint is detected (is_causal=None)."""
    layer = torch.nn.TransformerEncoderLayer(**_layer_kwargs(batch_first=batch_first))
    reference = torch.nn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False)
    fast = fnn.TransformerEncoder(layer, 2, norm=torch.nn.LayerNorm(E), enable_nested_tensor=False)
    assert all(type(m) is fnn.TransformerEncoderLayer for m in fast.layers)
    assert type(layer) is torch.nn.TransformerEncoderLayer  # the prototype is copied, not swapped
    masks = {"mask": causal_float_mask(L), "src_key_padding_mask": random_bool_mask(N, L)}
    check_against_torch(reference, fast, (_seq(L, batch_first),), masks, backend=backend)


@pytest.mark.parametrize("norm_first, backend", cases_on_backends({"pre-norm": True}, LAYER_OPS, ()))
def test_decoder_stack_matches_torch(norm_first, backend):
    layer = torch.nn.TransformerDecoderLayer(**_layer_kwargs(norm_first=norm_first))
    reference = torch.nn.TransformerDecoder(layer, 2, norm=torch.nn.LayerNorm(E))
    fast = fnn.TransformerDecoder(layer, 2, norm=torch.nn.LayerNorm(E))
    masks = {"tgt_mask": causal_float_mask(L).bool(), "memory_key_padding_mask": random_bool_mask(N, S)}
    check_against_torch(reference, fast, (_seq(L, False), _seq(S, False)), masks, backend=backend)


TRANSFORMER_CASES = {
    "batch-first": {"batch_first": True},
    "pre-norm-gelu-nobias": {"norm_first": True, "activation": "gelu", "bias": False},
}


@pytest.mark.parametrize("options, backend", cases_on_backends(TRANSFORMER_CASES, LAYER_OPS, ()))
def test_transformer_matches_torch(options, backend):
    kwargs = {"num_encoder_layers": 1, "num_decoder_layers": 1, **_layer_kwargs(**options)}
    batch_first = options.get("batch_first", False)
    masks = {
        "tgt_mask": torch.nn.Transformer.generate_square_subsequent_mask(L),
        "src_key_padding_mask": random_bool_mask(N, S),
        "memory_key_padding_mask": random_bool_mask(N, S),
    }
    check_against_torch(
        torch.nn.Transformer(**kwargs),
        fnn.Transformer(**kwargs),
        (_seq(S, batch_first), _seq(L, batch_first)),
        masks,
        backend=backend,
    )


def test_layers_train_mode_dropout():
    """Dropout in training: eval equals torch's eval; a training step is seeded, differs from eval,
    and gradients reach every parameter."""
    kwargs = _layer_kwargs(dropout=0.2, batch_first=True)
    reference = torch.nn.TransformerEncoderLayer(**kwargs).eval()
    fast = fnn.TransformerEncoderLayer(**kwargs).eval()
    x = _seq(L, True)
    check_against_torch(reference, fast, (x,))
    fast.train()
    x = x.float()
    torch.manual_seed(3)
    first = fast(x)
    torch.manual_seed(3)
    assert torch.equal(first, fast(x))
    assert not torch.allclose(first, fast.eval()(x))
    first.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fast.parameters())


# --------------------------------------------------------------------------------------------
# Softmax, LayerNorm, RMSNorm, FeedForward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_softmax_matches_torch(dim):
    check_against_torch(torch.nn.Softmax(dim), fnn.Softmax(dim), (torch.randn(3, 4, 5, dtype=torch.float64) * 3,))


def test_softmax_implicit_dim_warns_like_torch():
    x = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        torch.testing.assert_close(fnn.Softmax()(x), torch.softmax(x, dim=0))


NORM_CASES = {
    "affine": {"normalized_shape": E},
    "no-affine": {"normalized_shape": E, "elementwise_affine": False},
    "2d-shape-eps": {"normalized_shape": (4, 8), "eps": 1e-3},
}


@pytest.mark.parametrize("backend", backend_cases("layer_norm"))
@pytest.mark.parametrize("case", [*NORM_CASES, "no-bias"])
def test_layer_norm_matches_torch(case, backend):
    kwargs = NORM_CASES.get(case, {"normalized_shape": E, "bias": False})
    x = torch.randn(3, 5, 4, 8, dtype=torch.float64).reshape(3, 5, E) * 2 + 1
    reference = torch.nn.LayerNorm(**kwargs)
    if reference.weight is not None:  # not the init's ones/zeros: random parameters
        torch.nn.init.normal_(reference.weight)
        if reference.bias is not None:
            torch.nn.init.normal_(reference.bias)
    x = x.reshape(3, 5, 4, 8) if case == "2d-shape-eps" else x
    check_against_torch(reference, fnn.LayerNorm(**kwargs), (x,), backend=backend)


@pytest.mark.parametrize("backend", backend_cases("rms_norm"))
@pytest.mark.parametrize("case", [*NORM_CASES, "eps-none"])
def test_rms_norm_matches_torch(case, backend):
    kwargs = NORM_CASES.get(case, {"normalized_shape": E, "eps": None})
    x = torch.randn(3, 5, E, dtype=torch.float64)
    x = x.reshape(3, 5, 4, 8) if case == "2d-shape-eps" else x
    reference = torch.nn.RMSNorm(**kwargs)
    if reference.weight is not None:
        torch.nn.init.normal_(reference.weight)
    check_against_torch(reference, fnn.RMSNorm(**kwargs), (x,), backend=backend)


@pytest.mark.parametrize("norm_class", ["LayerNorm", "RMSNorm"])
def test_norm_low_precision_input_with_float32_parameters(norm_class):
    """torch takes bf16 activations with fp32 norm parameters (returning bf16): so do the twins."""
    reference = getattr(torch.nn, norm_class)(E)
    torch.nn.init.normal_(reference.weight)
    fast = getattr(fnn, norm_class)(E)
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(N, L, E, dtype=torch.float64)
    oracle = reference.double()(x)
    naive, out = reference.float()(x.bfloat16()), fast(x.bfloat16())
    assert out.dtype == naive.dtype == torch.bfloat16
    assert_rule(out, naive, oracle, k=2)


class TorchFeedForward(torch.nn.Module):
    """The FFN written with torch ops on the same fc1/fc2 parameters: FeedForward's oracle."""

    def __init__(self, fast: fnn.FeedForward):
        super().__init__()
        self.fc1, self.fc2, self.activation = copy.deepcopy(fast.fc1), copy.deepcopy(fast.fc2), fast.activation

    def forward(self, x):
        return self.fc2(activate(self.fc1(x), self.activation))


@pytest.mark.parametrize("backend", backend_cases("feed_forward"))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_feed_forward_matches_torch(activation, backend):
    fast = fnn.FeedForward(E, 48, activation=activation, bias=activation != "relu")
    gated = activation in GATED_ACTIVATIONS
    assert fast.fc1.weight.shape == ((96 if gated else 48), E) and fast.fc2.weight.shape == (E, 48)
    assert (fast.fc1.bias is None) == (activation == "relu")
    x = torch.randn(N, L, E, dtype=torch.float64)
    check_against_torch(TorchFeedForward(fast), fast, (x,), backend=backend)


def test_feed_forward_dropout_is_unbiased():
    ffn = fnn.FeedForward(E, 48, activation="gelu", dropout=0.3)
    x = torch.randn(4, E)
    with torch.no_grad():
        expected = ffn.eval()(x)
        ffn.train()
        draws = torch.stack([ffn(x) for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    single_err = (draws - expected).abs().amax(dim=(1, 2)).mean()
    assert (draws.mean(0) - expected).abs().max() < single_err / 5


def test_feed_forward_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        fnn.FeedForward(E, 48, activation="tanh")
    with pytest.raises(ValueError, match="dropout"):
        fnn.FeedForward(E, 48, dropout=1.0)
    with pytest.raises(ValueError, match="hidden"):
        fnn.FeedForward(E, 0)


# --------------------------------------------------------------------------------------------
# drop-in properties: signatures, construction, state_dict, dtypes, autocast, compile, DDP
# --------------------------------------------------------------------------------------------


def _parameters(function):
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("torch_class", list(fnn.TORCH_TWINS), ids=lambda c: c.__name__)
def test_same_signatures_as_torch(torch_class):
    twin = fnn.TORCH_TWINS[torch_class]
    assert issubclass(twin, torch_class)
    assert _parameters(twin.__init__) == _parameters(torch_class.__init__)
    assert _parameters(twin.forward) == _parameters(torch_class.forward)


CONSTRUCTORS = {
    "MultiheadAttention": lambda nn: nn.MultiheadAttention(E, H, add_bias_kv=True, kdim=24, vdim=16),
    "TransformerEncoderLayer": lambda nn: nn.TransformerEncoderLayer(E, H, 64),
    "TransformerDecoderLayer": lambda nn: nn.TransformerDecoderLayer(E, H, 64, norm_first=True),
    "TransformerEncoder": lambda nn: nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 64), 2, nn.LayerNorm(E)),
    "TransformerDecoder": lambda nn: nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, 64), 2),
    "Transformer": lambda nn: nn.Transformer(E, H, 1, 1, 64),
    "LayerNorm": lambda nn: nn.LayerNorm((4, 8), bias=False),
    "RMSNorm": lambda nn: nn.RMSNorm(E),
}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_construction_and_state_dict_match_torch(name):
    """Same seed, same parameters and keys; state_dicts load both ways (strict)."""
    torch.manual_seed(7)
    reference = CONSTRUCTORS[name](torch.nn)
    torch.manual_seed(7)
    fast = CONSTRUCTORS[name](fnn)
    assert isinstance(fast, getattr(torch.nn, name))
    ours, theirs = fast.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert [n for n, _ in fast.named_modules()] == [n for n, _ in reference.named_modules()]
    fresh = CONSTRUCTORS[name](fnn)
    fresh.load_state_dict(theirs)
    assert all(torch.equal(fresh.state_dict()[k], theirs[k]) for k in theirs)
    CONSTRUCTORS[name](torch.nn).load_state_dict(ours)


def test_submodules_run_through_fastattn():
    layer = fnn.Transformer(E, H, 1, 1, 64)
    kinds = {type(m) for m in layer.modules()}
    assert kinds.isdisjoint(fnn.TORCH_TWINS)  # every torch module with a twin was swapped
    assert type(layer.encoder.layers[0].self_attn) is fnn.MultiheadAttention
    assert type(layer.decoder.norm) is fnn.LayerNorm


def test_float64_runs_on_reference_backend():
    """float64 has no kernel: the dispatch runs it on the reference backend, exact to the oracle."""
    reference = torch.nn.TransformerEncoderLayer(**_layer_kwargs(batch_first=True)).double()
    fast = fnn.TransformerEncoderLayer(**_layer_kwargs(batch_first=True)).double()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(N, L, E, dtype=torch.float64)
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("module", ["mha", "mha-weights", "encoder-layer", "feed-forward"])
def test_autocast(module, dtype):
    """Under autocast the modules give torch's output dtypes and follow the rule (naive: torch under
    the same autocast; oracle: float64 without)."""
    x = torch.randn(N, L, E)
    if module.startswith("mha"):
        reference, fast = (
            torch.nn.MultiheadAttention(E, H, batch_first=True),
            fnn.MultiheadAttention(E, H, batch_first=True),
        )
        kwargs = {"need_weights": module == "mha-weights", "key_padding_mask": random_bool_mask(N, L)}
        args = (x, x, x)
    elif module == "encoder-layer":
        kwargs, args = {"src_mask": causal_float_mask(L).float(), "is_causal": True}, (x,)
        reference = torch.nn.TransformerEncoderLayer(**_layer_kwargs(batch_first=True, norm_first=True))
        fast = fnn.TransformerEncoderLayer(**_layer_kwargs(batch_first=True, norm_first=True))
    else:
        kwargs, args = {}, (x,)
        fast = fnn.FeedForward(E, 48, activation="gelu")
        reference = TorchFeedForward(fast)
    fast.load_state_dict(reference.state_dict())
    oracle = _outputs(copy.deepcopy(reference).double()(*(a.double() for a in args), **kwargs))
    with torch.autocast("cpu", dtype=dtype):
        naive = _outputs(reference(*args, **kwargs))
        out = _outputs(fast(*args, **kwargs))
    for o, n, r in zip(out, naive, oracle):
        assert o.dtype == n.dtype
        assert_rule(o, n, r, k=2, dtype=dtype)


def test_torch_compile_fullgraph():
    layer = fnn.TransformerEncoderLayer(**_layer_kwargs(batch_first=True))
    x = torch.randn(N, L, E)
    mask = causal_float_mask(L).float()
    expected = layer(x, src_mask=mask, is_causal=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x, src_mask=mask, is_causal=True)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_ddp_trains():
    """DistributedDataParallel (gloo, one process) wraps and trains a fastattn layer."""
    import torch.distributed as dist

    model = fnn.TransformerEncoderLayer(**_layer_kwargs(batch_first=True, dropout=0.1))
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        try:
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
            x, target = torch.randn(N, L, E), torch.randn(N, L, E)
            losses = []
            for _ in range(8):
                loss = F.mse_loss(ddp(x), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        finally:
            dist.destroy_process_group()
    assert losses[-1] < losses[0]


class _PlainLayerNorm(fnn.LayerNorm):
    pass


class _PlainRMSNorm(fnn.RMSNorm):
    pass


class _ScaledLayerNorm(fnn.LayerNorm):
    def forward(self, input):  # noqa: A002
        return 2.0 * super().forward(input)


class _ScaledRMSNorm(fnn.RMSNorm):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_norm_subclasses_run_without_recursion():
    """Subclasses of fastattn's norms (with or without their own forward) compute torch's norm."""
    x = torch.randn(3, 8, dtype=torch.float64)
    for cls, scale in ((_PlainLayerNorm, 1.0), (_ScaledLayerNorm, 2.0)):
        norm = cls(8, dtype=torch.float64)
        torch.nn.init.normal_(norm.weight)
        expected = scale * F.layer_norm(x, (8,), norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(norm(x), expected)
    for cls, scale in ((_PlainRMSNorm, 1.0), (_ScaledRMSNorm, 2.0)):
        norm = cls(8, dtype=torch.float64)
        torch.nn.init.normal_(norm.weight)
        expected = scale * F.rms_norm(x, (8,), norm.weight, norm.eps)
        torch.testing.assert_close(norm(x), expected)


def test_apply_norm_calls_an_overridden_forward():
    """A torch-norm subclass with its own forward is called as is, inheriting torch's forward is fused."""
    from fastattn.nn.layers import apply_norm

    class Doubled(torch.nn.LayerNorm):
        def forward(self, input):  # noqa: A002
            return 2.0 * super().forward(input)

    class Inherited(torch.nn.RMSNorm):
        pass

    x, residual = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    doubled = Doubled(8, dtype=torch.float64)
    out, total = apply_norm(doubled, x, residual)
    torch.testing.assert_close(out, 2.0 * F.layer_norm(x + residual, (8,), doubled.weight, doubled.bias))
    torch.testing.assert_close(total, x + residual)
    inherited = Inherited(8, dtype=torch.float64)
    torch.testing.assert_close(apply_norm(inherited, x), F.rms_norm(x, (8,), inherited.weight))
