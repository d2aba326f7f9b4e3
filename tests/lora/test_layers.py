"""LoRA wrappers: identity at init, merge algebra, gradients, dropout, references."""
import copy
import functools
import math

import pytest
import torch
from helpers import randomize_b, tiny_htdemucs
from torch import nn

from demucs_lora.core.errors import ConfigError
from demucs_lora.lora.config import BIAS_MODES
from demucs_lora.lora.layers import (
    SUPPORTED_TYPES, LoRAConv1d, LoRAConv2d, LoRAConvTranspose1d,
    LoRAConvTranspose2d, LoRAEmbedding, LoRALayer, LoRALinear, LoRAMultiheadAttention,
    params_per_rank, wrap_module)

R = 3


def _mha_call(layer, x):
    return layer(x, x, x, need_weights=False)[0]


# name -> (module factory, input factory, wrapper class, forward)
CASES = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6), LoRALinear, None),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2),
               lambda: torch.randn(2, 4, 21), LoRAConv1d, None),
    "conv2d": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0)),
               lambda: torch.randn(2, 4, 12, 5), LoRAConv2d, None),
    "convtr1d": (lambda: nn.ConvTranspose1d(6, 4, 8, stride=4, padding=2),
                 lambda: torch.randn(2, 6, 9), LoRAConvTranspose1d, None),
    "convtr2d": (lambda: nn.ConvTranspose2d(6, 4, (8, 1), stride=(4, 1)),
                 lambda: torch.randn(2, 6, 5, 3), LoRAConvTranspose2d, None),
    "mha": (lambda: nn.MultiheadAttention(16, 4, batch_first=True),
            lambda: torch.randn(2, 5, 16), LoRAMultiheadAttention, _mha_call),
    "embedding": (lambda: nn.Embedding(10, 6), lambda: torch.randint(0, 10, (3, 7)),
                  LoRAEmbedding, None),
}


def _build(name, **kw):
    torch.manual_seed(0)
    make_module, make_input, cls, call = CASES[name]
    module = make_module()
    x = make_input()
    # The reference is frozen like the wrapped base: ATen's matmul folds a
    # non-contiguous input differently when the weight requires grad (last-bit
    # differences even under no_grad), and the wrapper always freezes its base.
    ref = copy.deepcopy(module).requires_grad_(False)
    layer = wrap_module(module, R, **kw)
    assert type(layer) is cls
    return ref, layer, x, call or (lambda m, inp: m(inp))


_randomize = functools.partial(randomize_b, seed=1, std=0.3)


def _base_weights(layer):
    return {n: p.detach().clone() for n, p in layer.base.named_parameters()}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", CASES)
def test_identity_at_init(name):
    ref, layer, x, call = _build(name)
    ref.train()
    layer.train()  # MHA: the base's eval fast path is a different kernel, see below
    assert (call(layer, x) - call(ref, x)).abs().max().item() == 0
    if name != "mha":
        ref.eval()
        layer.eval()
        assert (call(layer, x) - call(ref, x)).abs().max().item() == 0


def test_mha_identity_in_eval():
    ref, layer, x, call = _build("mha")
    ref.eval()
    layer.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        assert (call(layer, x) - call(ref, x)).abs().max().item() == 0
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    # With the fast path the base runs torch's fused native kernel: same math,
    # different rounding.
    assert _rel(call(layer, x), call(ref, x)) < 1e-6


@pytest.mark.parametrize("name", CASES)
def test_merge_unmerge(name):
    ref, layer, x, call = _build(name)
    layer.eval()
    _randomize(layer)
    original = _base_weights(layer)
    unmerged = call(layer, x).detach()
    assert _rel(unmerged, call(ref, x)) > 1e-3  # the adapter does something
    layer.merge()
    assert layer.merged
    merged_weights = _base_weights(layer)
    merged = call(layer, x).detach()
    assert _rel(merged, unmerged) < 1e-5
    layer.merge()  # no double add
    for key, value in _base_weights(layer).items():
        assert torch.equal(value, merged_weights[key]), key
    assert torch.equal(call(layer, x), merged)
    layer.unmerge()
    assert not layer.merged
    for key, value in _base_weights(layer).items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6)
    layer.unmerge()  # no double subtract
    for key, value in _base_weights(layer).items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6)
    assert _rel(call(layer, x), unmerged) < 1e-5


@pytest.mark.parametrize("bias", BIAS_MODES)
@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_only_adapter(name, bias):
    _, layer, x, call = _build(name, bias=bias)
    _randomize(layer)
    layer.train()
    call(layer, x).pow(2).sum().backward()
    lora = dict(layer.lora_named_parameters())
    assert lora and all(n.startswith("lora_") for n in lora)
    for param in lora.values():
        assert param.requires_grad and param.grad is not None
        assert param.grad.abs().sum() > 0
    for pname, param in layer.base.named_parameters():
        is_bias = pname.endswith("bias")
        expect = bias != "none" and is_bias
        assert param.requires_grad == expect, pname
        assert (param.grad is not None) == expect, pname


@pytest.mark.parametrize("name", CASES)
def test_dropout_train_only(name):
    _, layer, x, call = _build(name, dropout=0.5)
    _randomize(layer)
    layer.eval()
    first = call(layer, x)
    assert torch.equal(first, call(layer, x))
    layer.train()
    torch.manual_seed(3)
    noisy = call(layer, x)
    assert not torch.equal(noisy, first)
    assert not torch.equal(noisy, call(layer, x))


@pytest.mark.parametrize("name", CASES)
def test_rslora_scaling(name):
    ref, plain, x, call = _build(name, alpha=8)
    _, rs, _, _ = _build(name, alpha=8, rslora=True)
    assert plain.scaling == pytest.approx(8 / R)
    assert rs.scaling == pytest.approx(8 / math.sqrt(R))
    _randomize(plain)
    _randomize(rs)
    plain_delta, rs_delta = plain.delta_weight(), rs.delta_weight()
    if name == "mha":
        plain_delta, rs_delta = plain_delta["in_proj_weight"], rs_delta["in_proj_weight"]
    torch.testing.assert_close(rs_delta, plain_delta * math.sqrt(R))
    if name != "mha":  # the output moves linearly with the scaling (not so through softmax)
        base_out = call(ref, x)
        gain = (call(rs, x) - base_out).norm() / (call(plain, x) - base_out).norm()
        assert gain.item() == pytest.approx(math.sqrt(R), rel=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_params_per_rank_matches_factors(name):
    make_module = CASES[name][0]
    module = make_module()
    per_rank = params_per_rank(module)
    for r in (1, 4):
        layer = wrap_module(make_module(), r)
        assert sum(p.numel() for p in layer.lora_parameters()) == r * per_rank
    assert params_per_rank(layer) == per_rank


def test_factor_shapes():
    lin = wrap_module(nn.Linear(6, 5), 2)
    assert (lin.lora_A.shape, lin.lora_B.shape) == ((2, 6), (5, 2))
    c1 = wrap_module(nn.Conv1d(4, 6, 3), 2)
    assert (c1.lora_A.shape, c1.lora_B.shape) == ((2, 4, 3), (6, 2, 1))
    c2 = wrap_module(nn.Conv2d(4, 6, (3, 1)), 2)
    assert (c2.lora_A.shape, c2.lora_B.shape) == ((2, 4, 3, 1), (6, 2, 1, 1))
    t1 = wrap_module(nn.ConvTranspose1d(6, 4, 8), 2)
    assert (t1.lora_A.shape, t1.lora_B.shape) == ((2, 6), (2, 4, 8))
    t2 = wrap_module(nn.ConvTranspose2d(6, 4, (8, 1)), 2)
    assert (t2.lora_A.shape, t2.lora_B.shape) == ((2, 6), (2, 4, 8, 1))
    emb = wrap_module(nn.Embedding(10, 6), 2)
    assert (emb.lora_A.shape, emb.lora_B.shape) == ((2, 10), (6, 2))
    mha = wrap_module(nn.MultiheadAttention(16, 4), 2, enable_qkv=(False, True, False))
    assert sorted(n for n, _ in mha.lora_named_parameters()) == [
        "lora_A_k", "lora_A_o", "lora_B_k", "lora_B_o"]
    assert mha.lora_A_k.shape == (2, 16) and mha.lora_B_o.shape == (16, 2)
    assert params_per_rank(nn.MultiheadAttention(16, 4), (True, True, True)) == 2 * 16 * 4


def test_dispatch_and_errors():
    mha = nn.MultiheadAttention(16, 4)
    assert isinstance(wrap_module(mha.out_proj, 2), LoRALinear)  # NonDynamicallyQuantizable
    assert all(issubclass(t, nn.Module) for t in SUPPORTED_TYPES)
    with pytest.raises(ConfigError, match="LSTM"):
        wrap_module(nn.LSTM(4, 4), 2)
    with pytest.raises(ConfigError, match="Conv3d"):
        params_per_rank(nn.Conv3d(2, 2, 1))
    with pytest.raises(ConfigError, match="groups"):
        wrap_module(nn.Conv1d(4, 4, 3, groups=2), 2)
    with pytest.raises(ConfigError, match="groups"):
        wrap_module(nn.ConvTranspose2d(4, 4, 3, groups=4), 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="rank"):
            wrap_module(nn.Linear(4, 4), bad)
    with pytest.raises(ConfigError, match="lora_bias"):
        wrap_module(nn.Linear(4, 4), 2, bias="some")
    with pytest.raises(ConfigError, match="lora_dropout"):
        wrap_module(nn.Linear(4, 4), 2, dropout=1.0)
    with pytest.raises(ConfigError, match="kdim"):
        wrap_module(nn.MultiheadAttention(16, 4, kdim=8, vdim=8), 2)
    with pytest.raises(ConfigError, match="enable_qkv"):
        wrap_module(nn.MultiheadAttention(16, 4), 2, enable_qkv=(True, False))
    with pytest.raises(ConfigError, match="already"):
        wrap_module(wrap_module(nn.Linear(4, 4), 2), 2)


def test_wrapper_inherits_training_mode():
    assert not wrap_module(nn.MultiheadAttention(16, 4, dropout=0.5).eval(), 2).training
    assert wrap_module(nn.Linear(4, 4), 2).training


def test_attribute_fallback_and_unwrap():
    base = nn.MultiheadAttention(16, 4, batch_first=True)
    layer = wrap_module(base, 2)
    assert layer.in_proj_weight is base.in_proj_weight
    assert layer.batch_first is True and layer.embed_dim == 16 and layer.num_heads == 4
    assert layer.out_proj is base.out_proj
    with pytest.raises(AttributeError):
        layer.no_such_attribute
    conv = nn.Conv1d(4, 6, 3)
    wrapped = wrap_module(conv, 2)
    assert wrapped.weight is conv.weight and wrapped.bias is conv.bias
    assert wrapped.kernel_size == (3,)
    _randomize(wrapped)
    x = torch.randn(1, 4, 10)
    expect = wrapped(x)
    plain = wrapped.unwrap()
    assert type(plain) is nn.Conv1d and plain is conv
    assert _rel(plain(x), expect) < 1e-5
    assert wrapped.merged
    # deepcopy keeps working with the fallback in place
    clone = copy.deepcopy(layer)
    assert clone.base is not base and clone.embed_dim == 16


@pytest.mark.slow  # imports peft (seconds)
@pytest.mark.parametrize("name", ["linear", "conv1d", "conv2d"])
def test_matches_peft(name):
    peft = pytest.importorskip("peft", reason="peft is a test extra")
    torch.manual_seed(0)
    if name == "linear":
        base, x = nn.Linear(6, 5), torch.randn(3, 6)
    elif name == "conv1d":  # PEFT drops the dilation, so compare undilated
        base, x = nn.Conv1d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 21)
    else:
        base, x = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0)), torch.randn(2, 4, 9, 5)
    ours = wrap_module(copy.deepcopy(base), 4, alpha=8)
    _randomize(ours)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0"])
    model = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), config)
    theirs = model.base_model.model[0]
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.view_as(theirs.lora_A["default"].weight))
        theirs.lora_B["default"].weight.copy_(ours.lora_B.view_as(theirs.lora_B["default"].weight))
    model.eval()
    ours.eval()
    assert _rel(ours(x), model(x)) < 1e-5


@pytest.mark.parametrize("output_size", [None, "bigger"])
@pytest.mark.parametrize("name", ["convtr1d", "convtr2d"])
def test_conv_transpose_matches_dense(name, output_size):
    ref, layer, x, _ = _build(name)
    _randomize(layer)
    dense = copy.deepcopy(ref)
    with torch.no_grad():
        dense.weight += layer.delta_weight()
    size = None
    if output_size:
        size = list(dense(x).shape[2:])
        size[0] += 2  # within stride - 1 of the default: legal output_padding
    assert _rel(layer(x, size), dense(x, size)) < 1e-5
    if size:
        assert list(layer(x, size).shape[2:]) == size


MASKS = ["none", "attn_bool", "attn_float", "padding", "both", "causal"]


def _masks(kind, bsz, tgt, src, heads):
    gen = torch.Generator().manual_seed(5)
    attn, pad = None, None
    if kind in ("attn_bool", "both"):
        attn = torch.rand(tgt, src, generator=gen) > 0.7
        attn[:, 0] = False  # no fully masked row
    if kind == "attn_float":
        attn = torch.randn(bsz * heads, tgt, src, generator=gen)
    if kind in ("padding", "both"):
        pad = torch.zeros(bsz, src, dtype=torch.bool)
        pad[0, -2:] = True
    if kind == "causal":
        attn = nn.Transformer.generate_square_subsequent_mask(tgt)
    return attn, pad


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_matches_dense(batch_first, cross, mask, need_weights):
    torch.manual_seed(0)
    heads, bsz, tgt = 4, 2, 5
    src = 7 if cross and mask != "causal" else tgt
    base = nn.MultiheadAttention(16, heads, batch_first=batch_first)
    dense = copy.deepcopy(base)
    layer = wrap_module(base, R, enable_qkv=(True, True, True) if cross else (True, False, True))
    _randomize(layer)
    with torch.no_grad():
        for key, delta in layer.delta_weight().items():
            dense.get_parameter(key).add_(delta)
    q = torch.randn(bsz, tgt, 16)
    k = torch.randn(bsz, src, 16) if cross else q
    if not batch_first:
        q, k = q.transpose(0, 1), (k.transpose(0, 1) if cross else q.transpose(0, 1))
    attn, pad = _masks(mask, bsz, tgt, src, heads)
    kw = dict(attn_mask=attn, key_padding_mask=pad, need_weights=need_weights,
              is_causal=mask == "causal")
    for module in (layer, dense):
        module.eval()
    out, weights = layer(q, k, k, **kw)
    ref_out, ref_weights = dense(q, k, k, **kw)
    assert _rel(out, ref_out) < 1e-5
    if need_weights:
        assert _rel(weights, ref_weights) < 1e-5
        per_head, ref_per_head = (m(q, k, k, average_attn_weights=False, **kw)[1]
                                  for m in (layer, dense))
        assert per_head.shape == (bsz, heads, tgt, src)
        assert _rel(per_head, ref_per_head) < 1e-5
    else:
        assert weights is None and ref_weights is None


def test_mha_unbatched_and_dropout():
    torch.manual_seed(0)
    base = nn.MultiheadAttention(16, 4, dropout=0.5)
    dense = copy.deepcopy(base)
    layer = wrap_module(base, R)
    _randomize(layer)
    with torch.no_grad():
        for key, delta in layer.delta_weight().items():
            dense.get_parameter(key).add_(delta)
    x, mem = torch.randn(5, 16), torch.randn(7, 16)
    layer.eval()
    dense.eval()
    out, weights = layer(x, mem, mem)
    ref_out, ref_weights = dense(x, mem, mem)
    assert out.shape == (5, 16) and weights.shape == (5, 7)
    assert _rel(out, ref_out) < 1e-5 and _rel(weights, ref_weights) < 1e-5
    # base dropout is applied to the attention probabilities in training only
    layer.train()
    dense.train()
    for need_weights in (False, True):
        torch.manual_seed(7)
        noisy = layer(x, mem, mem, need_weights=need_weights)[0]
        torch.manual_seed(7)
        ref_noisy = dense(x, mem, mem, need_weights=need_weights)[0]
        assert not torch.allclose(noisy, out)
        assert _rel(noisy, ref_noisy) < 1e-5


def test_transformer_encoder_layer_fast_path_is_blocked():
    """nn.TransformerEncoderLayer's fused eval path reads self_attn's base weights
    directly; a wrapped self_attn must switch it off or the adapter is ignored."""
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True).eval()
    dense = copy.deepcopy(block)
    block.self_attn = wrap_module(block.self_attn, R)
    _randomize(block.self_attn)
    with torch.no_grad():
        for key, delta in block.self_attn.delta_weight().items():
            dense.self_attn.get_parameter(key).add_(delta)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert _rel(block(x), dense(x)) < 1e-5


def test_embedding_padding_row_stays_put():
    torch.manual_seed(0)
    layer = wrap_module(nn.Embedding(10, 6, padding_idx=0), R)
    _randomize(layer)
    idx = torch.tensor([[0, 1, 2, 0, 5]])
    layer(idx).pow(2).sum().backward()
    with torch.no_grad():
        for p in layer.lora_parameters():
            p -= 0.1 * p.grad
    assert layer.delta_weight()[0].abs().max() == 0
    assert layer(idx)[0, 0].abs().max() == 0


@pytest.mark.parametrize("name", ["linear", "conv1d", "convtr2d", "embedding"])
def test_bfloat16_autocast_and_half_base(name):
    ref, layer, x, call = _build(name)
    _randomize(layer)
    full = call(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(layer, x)
        ref_out = call(ref, x)
    assert out.dtype == ref_out.dtype
    assert _rel(out.float(), full) < 3e-2
    half = copy.deepcopy(layer).to(torch.bfloat16)
    half_x = x if name == "embedding" else x.to(torch.bfloat16)
    out = call(half, half_x)
    assert out.dtype == torch.bfloat16 and _rel(out.float(), full) < 3e-2
    # a bf16 base gets float32 factors
    fresh = wrap_module(copy.deepcopy(ref).to(torch.bfloat16), R)
    assert all(p.dtype == torch.float32 for p in fresh.lora_parameters())
    assert call(fresh, half_x).dtype == torch.bfloat16
    fresh.merge()
    assert fresh.base.weight.dtype == torch.bfloat16


def _wrap_everything(model, r=4):
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_TYPES) or isinstance(module, LoRALayer):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(parent, nn.MultiheadAttention):
            continue  # out_proj: covered by the attention wrapper
        targets.append((parent, attr, module))
    layers = []
    for parent, attr, module in targets:
        layer = wrap_module(module, r)
        setattr(parent, attr, layer)
        layers.append(layer)
    return layers


def test_tiny_htdemucs_wrapped_everywhere():
    model = tiny_htdemucs(t_layers=2)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 44100)
    model.train()  # HTDemucs has no dropout by default; train avoids the MHA fast path
    model.requires_grad_(False)  # frozen like every wrapped base (see _build)
    with torch.no_grad():
        base_out = model(x)
    layers = _wrap_everything(model)
    kinds = {type(layer).__name__ for layer in layers}
    assert kinds == {"LoRAConv1d", "LoRAConv2d", "LoRAConvTranspose1d", "LoRAConvTranspose2d",
                     "LoRALinear", "LoRAMultiheadAttention", "LoRAEmbedding"}
    assert len(layers) == 44 + 12 + 4 + 4 + 8 + 4 + 1
    assert not any(isinstance(m, nn.MultiheadAttention) and not isinstance(p, LoRALayer)
                   for p in model.modules() for m in p.children())
    with torch.no_grad():
        assert (model(x) - base_out).abs().max().item() == 0
        for seed, layer in enumerate(layers):
            _randomize(layer, std=0.05, seed=seed)
        unmerged = model(x)
        assert _rel(unmerged, base_out) > 1e-3
        for layer in layers:
            layer.merge()
        merged = model(x)
    assert _rel(merged, unmerged) < 1e-4
    model.eval()
    with torch.no_grad():
        assert _rel(model(x), unmerged) < 1e-4
    # one training step, unmerged: every factor gets a gradient, nothing else does
    for layer in layers:
        layer.unmerge()
    model.train()
    model(x[..., :8192]).pow(2).mean().backward()
    lora = {id(p) for layer in layers for p in layer.lora_parameters()}
    for name, param in model.named_parameters():
        has_grad = param.grad is not None and param.grad.abs().sum() > 0
        assert has_grad == (id(param) in lora), name
