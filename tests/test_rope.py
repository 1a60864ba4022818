"""continuous_rope: values, gradients and transforms against independent references."""

import os
import subprocess
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import TrainingArgs, train
from mlx_lm.tuner.utils import linear_to_lora_layers

import repo_mlx
from repo_mlx import kernel_checks as kc
from repo_mlx import rope

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16


# ----------------------------------------------------------- float64 references
ref_rotate, ref_grads, f64 = kc.reference_rotate, kc.reference_grads, kc.f64


def plain_rotate(x, p, w, a=1.0):
    """The rotation as separate, autodiff-able MLX ops (no custom VJP, no kernel)."""
    angles = p.astype(F32)[..., None] * w
    c, s = (mx.cos(angles) * a).astype(x.dtype), (mx.sin(angles) * a).astype(x.dtype)
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def f64_inv_freq(head_dim, base):
    return base ** (-np.arange(0, head_dim, 2) / head_dim)


def inputs(B, H, N, D, dtype=F32, pmax=1000.0, pdtype=F32, seed=0):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((B, H, N, D)).astype(np.float32)).astype(dtype)
    p = mx.array(rng.uniform(-pmax, pmax, (B, H, N)).astype(np.float32)).astype(pdtype)
    g = mx.array(rng.standard_normal((B, H, N, D)).astype(np.float32)).astype(dtype)
    return x, p, g


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("N", [1, 257])
@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_matches_float64_reference(D, N, base):
    x, p, _ = inputs(2, 3, N, D, pmax=1000.0)  # positions negative and non-monotone
    want = ref_rotate(f64(x), f64(p), f64_inv_freq(D, base))
    out = rope.continuous_rope(x, p, base=base)
    assert out.dtype == F32 and out.shape == x.shape
    assert np.abs(f64(out) - want).max() <= 5e-4
    q, k = rope.continuous_rope_qk(x, 2 * x, p, base=base)
    assert np.abs(f64(q) - want).max() <= 5e-4
    assert np.abs(f64(k) - 2 * want).max() <= 1e-3


def test_yarn_frequencies_and_attention_factor():
    inv_freq, factor = rope.yarn_parameters(128, 500000.0, 4.0)
    assert factor == pytest.approx(0.1 * np.log(4.0) + 1.0)
    x, p, _ = inputs(1, 2, 33, 128, pmax=1000.0)
    out = rope.continuous_rope(x, p, inv_freq=inv_freq, attention_factor=factor)
    want = ref_rotate(f64(x), f64(p), f64(inv_freq), factor)
    assert np.abs(f64(out) - want).max() <= 5e-4 * factor


@pytest.mark.parametrize("dtype, tol", [(F16, 2.0**-10), (BF16, 2.0**-7)])
def test_half_precision_inputs(dtype, tol):
    x, p, _ = inputs(2, 3, 65, 64, dtype=dtype, pmax=1000.0)
    out = rope.continuous_rope(x, p, base=10000.0)
    assert out.dtype == dtype
    want = ref_rotate(f64(x), f64(p), f64_inv_freq(64, 10000.0))
    # cos and sin are rounded to the dtype, then two products and a sum are.
    assert (np.abs(f64(out) - want) / np.maximum(1.0, np.abs(want))).max() <= 6 * tol
    # Positions of any float dtype: angles are still float32.
    p16 = p.astype(dtype)
    assert mx.array_equal(
        rope.continuous_rope(x, p16, base=1e4), rope.continuous_rope(x, p16.astype(F32), base=1e4)
    )


@pytest.mark.parametrize("D", [64, 128])
def test_integer_positions_match_fast_rope(D):
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((2, 4, 300, D)).astype(np.float32))
    # Same frequencies (fast.rope takes periods): identical angles at any position.
    periods = mx.array((500000.0 ** (np.arange(0, D, 2) / D)).astype(np.float32))
    for offset in (0, 37, 4000):
        p = mx.broadcast_to(mx.arange(offset, offset + 300, dtype=F32), (2, 4, 300))
        ours = rope.continuous_rope(x, p, inv_freq=mx.reciprocal(periods))
        theirs = mx.fast.rope(
            x, D, traditional=False, base=None, freqs=periods, scale=1.0, offset=offset
        )
        assert mx.abs(ours - theirs).max().item() <= 1e-5
    # Same base: the float32 frequencies are computed differently, so stay at
    # positions where that cannot reach 1e-5.
    for base in (10000.0, 500000.0):
        y = x[:, :, :16]
        p = mx.broadcast_to(mx.arange(16, dtype=F32), (2, 4, 16))
        theirs = mx.fast.rope(y, D, traditional=False, base=base, scale=1.0, offset=0)
        assert mx.abs(rope.continuous_rope(y, p, base=base) - theirs).max().item() <= 1e-5


def test_positions_broadcast_over_heads():
    x, p, g = inputs(2, 3, 9, 16)
    shared = p[:, :1]  # one position per token, for every head
    out = rope.continuous_rope(x, shared, base=1e4)
    assert mx.allclose(out, rope.continuous_rope(x, mx.broadcast_to(shared, p.shape), base=1e4))
    dz = mx.grad(lambda z: (rope.continuous_rope(x, z, base=1e4) * g).sum())(shared)
    full = f64(mx.broadcast_to(shared, p.shape))
    _, want = ref_grads(f64(x), full, f64(g), f64_inv_freq(16, 1e4))
    assert dz.shape == shared.shape
    assert np.abs(f64(dz) - want.sum(1, keepdims=True)).max() <= 1e-3


def test_bad_arguments_are_refused():
    x, p, _ = inputs(1, 1, 2, 8)
    with pytest.raises(ValueError, match="exactly one of base and inv_freq"):
        rope.continuous_rope(x, p)
    with pytest.raises(ValueError, match="exactly one of base and inv_freq"):
        rope.continuous_rope(x, p, base=1e4, inv_freq=mx.ones(4))
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope.continuous_rope(mx.ones((1, 1, 2, 7)), p, base=1e4)
    with pytest.raises(ValueError, match="inv_freq must have shape"):
        rope.continuous_rope(x, p, inv_freq=mx.ones(3))
    with pytest.raises(ValueError, match="same shape and dtype"):
        rope.continuous_rope_qk(x, x[:, :, :1], p, base=1e4)


@pytest.mark.parametrize(
    "q_heads, k_shape, p_shape, match",
    [
        (5, (1, 2, 3, 8), (1, 2, 3), r"except Hq, a multiple of Hkv .* \(1, 5, 3, 8\)"),
        (4, (1, 3, 3, 8), (1, 3, 3), "a multiple of Hkv"),
        (4, (1, 2, 4, 8), (1, 2, 3), "same shape and dtype"),  # tokens differ
        (4, (2, 3, 8), (2, 3), "same shape and dtype"),  # ranks differ
        (4, (1, 2, 3, 8), (1, 4, 3), r"one per KV head .* got \(1, 4, 3\)"),  # per query head
        (2, (1, 2, 3, 8), (1, 3, 3), "one per KV head"),
    ],
)
def test_shapes_that_do_not_group_are_refused(q_heads, k_shape, p_shape, match):
    q = mx.zeros((1, q_heads, 3, 8))
    with pytest.raises(ValueError, match=match):
        rope.continuous_rope_qk(q, mx.zeros(k_shape), mx.zeros(p_shape), base=1e4)
    with pytest.raises(ValueError, match="same shape and dtype"):
        rope.continuous_rope_qk(mx.zeros((1, 4, 3, 8), F16), mx.zeros((1, 2, 3, 8)), 0, base=1e4)


# --------------------------------------------------------------- gradients
@pytest.mark.parametrize("D, N", [(64, 1), (128, 200)])
def test_gradients_match_float64_analytic(D, N):
    inv_freq, factor = rope.yarn_parameters(D, 500000.0, 2.0)
    w = f64(inv_freq)
    x, p, g = inputs(2, 3, N, D, pmax=1000.0)
    k, _, gk = inputs(2, 3, N, D, seed=1)
    kw = dict(inv_freq=inv_freq, attention_factor=factor)
    fn = lambda a, b, z: rope.continuous_rope_qk(a, b, z, **kw)  # noqa: E731
    _, (dx, dk, dp) = mx.vjp(fn, [x, k, p], [g, gk])
    want_dx, want_dp = ref_grads(f64(x), f64(p), f64(g), w, factor)
    want_dk, want_dpk = ref_grads(f64(k), f64(p), f64(gk), w, factor)
    assert dx.dtype == F32 and dp.dtype == F32 and dp.shape == p.shape
    # dx is a rotation: the forward's float32-angle bound applies.
    assert np.abs(f64(dx) - want_dx).max() <= 5e-4 * factor
    assert np.abs(f64(dk) - want_dk).max() <= 5e-4 * factor
    want_dp = want_dp + want_dpk
    # dp sums D/2 products and its float32 angles carry ~|p| * 6e-8 of error.
    assert np.abs(f64(dp) - want_dp).max() <= 2e-3 * max(1.0, np.abs(want_dp).max())


def test_gradients_match_finite_differences():
    """Gradients for queries, keys and positions against central differences of
    the float64 reference of the loss sum(q_out * gq) + sum(k_out * gk)."""
    D = 16
    inv_freq, factor = rope.yarn_parameters(D, 10000.0, 2.0, original_max_position_embeddings=8)
    q, p, gq = inputs(1, 2, 5, D, pmax=50.0)
    k, _, gk = inputs(1, 2, 5, D, seed=1)
    Q, K, P, GQ, GK, W = f64(q), f64(k), f64(p), f64(gq), f64(gk), f64(inv_freq)

    def loss(Q=Q, K=K, P=P):
        return (ref_rotate(Q, P, W, factor) * GQ).sum() + (ref_rotate(K, P, W, factor) * GK).sum()

    def fd(name, value):
        grad, h = np.zeros_like(value), 1e-6
        for i in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[i] += h
            down[i] -= h
            grad[i] = (loss(**{name: up}) - loss(**{name: down})) / (2 * h)
        return grad

    def ours(q, k, p):
        a, b = rope.continuous_rope_qk(q, k, p, inv_freq=inv_freq, attention_factor=factor)
        return (a * gq).sum() + (b * gk).sum()

    dq, dk, dp = mx.grad(ours, argnums=(0, 1, 2))(q, k, p)
    assert np.abs(f64(dq) - fd("Q", Q)).max() <= 1e-5
    assert np.abs(f64(dk) - fd("K", K)).max() <= 1e-5
    assert np.abs(f64(dp) - fd("P", P)).max() <= 1e-4


# ------------------------------------------------- grouped-query attention
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 2, 3, 4])
def test_grouped_heads_match_float64(D, G):
    """Query head h takes KV head h // G's positions; dz of a KV head sums its key
    and its G query heads. Values and all gradients against float64 (spec
    section 4 applied per query head, numpy)."""
    inputs = kc.rotation_inputs(F32, 33, heads=2, head_dim=D, group=G)
    got = kc.rotation_outputs(inputs)
    assert [a.shape for a in got] == [(2, 2 * G, 33, D), (2, 2, 33, D)] * 2 + [(2, 2, 33)]
    errs = kc.reference_errors(got, kc.reference_outputs(inputs))
    assert kc.within_reference(errs, F32), errs


def test_grouped_gradients_match_finite_differences():
    """3 query heads per KV head: d/dq, d/dk and d/dpositions against central
    differences of the float64 loss sum(q_out * gq) + sum(k_out * gk)."""
    D, G = 16, 3
    inv_freq, factor = rope.yarn_parameters(D, 10000.0, 2.0, original_max_position_embeddings=8)
    k, p, gk = inputs(1, 2, 5, D, pmax=50.0)
    q, _, gq = inputs(1, 2 * G, 5, D, seed=1)
    Q, K, P, GQ, GK, W = f64(q), f64(k), f64(p), f64(gq), f64(gk), f64(inv_freq)

    def loss(Q=Q, K=K, P=P):
        q_out = ref_rotate(Q, np.repeat(P, G, axis=1), W, factor)
        return (q_out * GQ).sum() + (ref_rotate(K, P, W, factor) * GK).sum()

    def fd(name, value):
        grad, h = np.zeros_like(value), 1e-6
        for i in np.ndindex(value.shape):
            up, down = value.copy(), value.copy()
            up[i] += h
            down[i] -= h
            grad[i] = (loss(**{name: up}) - loss(**{name: down})) / (2 * h)
        return grad

    def ours(q, k, p):
        a, b = rope.continuous_rope_qk(q, k, p, inv_freq=inv_freq, attention_factor=factor)
        return (a * gq).sum() + (b * gk).sum()

    dq, dk, dp = mx.grad(ours, argnums=(0, 1, 2))(q, k, p)
    assert np.abs(f64(dq) - fd("Q", Q)).max() <= 1e-5
    assert np.abs(f64(dk) - fd("K", K)).max() <= 1e-5
    assert np.abs(f64(dp) - fd("P", P)).max() <= 1e-4


def test_grouped_heads_under_compile_and_value_and_grad():
    """Grouping through mx.compile and nn.value_and_grad, against MLX's autodiff of
    the separate ops with keys and positions repeated per query head."""
    w = rope.inv_frequencies(32, 10000.0)
    q, _, gq = inputs(2, 6, 9, 32, seed=2)
    k, p, gk = inputs(2, 2, 9, 32, pmax=300.0)

    def loss(q, k, p, rotate):
        a, b = rotate(q, k, p)
        return (a * gq).sum() + (b * gk).sum()

    def grouped(q, k, p):
        return rope.continuous_rope_qk(q, k, p, inv_freq=w)

    def plain(q, k, p):
        return plain_rotate(q, mx.repeat(p, 3, axis=1), w), plain_rotate(k, p, w)

    want = mx.grad(lambda *a: loss(*a, plain), argnums=(0, 1, 2))(q, k, p)
    fn = mx.grad(lambda *a: loss(*a, grouped), argnums=(0, 1, 2))
    for got in (fn(q, k, p), mx.compile(fn)(q, k, p)):
        for g, w_ in zip(got, want):
            assert mx.allclose(g, w_, rtol=1e-4, atol=1e-3).item()


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_gradient_dtypes_follow_inputs(dtype):
    x, p, g = inputs(1, 2, 7, 32, dtype=dtype, pdtype=dtype, pmax=100.0)
    _, (dx, dp) = mx.vjp(lambda a, z: rope.continuous_rope(a, z, base=1e4), [x, p], [g])
    assert dx.dtype == dtype and dp.dtype == dtype
    want_dx, want_dp = ref_grads(f64(x), f64(p), f64(g), f64_inv_freq(32, 1e4))
    eps = 2.0**-10 if dtype == F16 else 2.0**-7
    assert np.abs(f64(dx) - want_dx).max() <= 8 * eps
    assert (np.abs(f64(dp) - want_dp) / np.maximum(1.0, np.abs(want_dp))).max() <= 4 * eps
    # float32 positions with half values: the gradient stays float32.
    _, (_, dp32) = mx.vjp(
        lambda a, z: rope.continuous_rope(a, z, base=1e4), [x, p.astype(F32)], [g]
    )
    assert dp32.dtype == F32


# -------------------------------------------------------------- transforms
def test_compile_grad_and_value_and_grad():
    x, p, g = inputs(2, 3, 17, 64, pmax=300.0)
    w = rope.inv_frequencies(64, 10000.0)

    def loss(x, p, rotate):
        q, k = rotate(x, p)
        return (q * g).sum() + (k * g[..., ::-1]).sum()

    def fused(x, p):
        return rope.continuous_rope_qk(x, 0.5 * x, p, inv_freq=w)

    def plain(x, p):
        return plain_rotate(x, p, w), plain_rotate(0.5 * x, p, w)

    # MLX's own autodiff of the separate ops is an independent reference.
    want_v, want_g = mx.value_and_grad(lambda a, z: loss(a, z, plain), argnums=(0, 1))(x, p)
    grad_fn = mx.value_and_grad(lambda a, z: loss(a, z, fused), argnums=(0, 1))
    for fn in (grad_fn, mx.compile(grad_fn)):
        v, (dx, dp) = fn(x, p)
        assert abs(v.item() - want_v.item()) <= 1e-4 * abs(want_v.item())
        assert mx.allclose(dx, want_g[0], atol=1e-5).item()
        assert mx.allclose(dp, want_g[1], rtol=1e-4, atol=1e-3).item()
    assert mx.array_equal(mx.compile(fused)(x, p)[0], fused(x, p)[0])

    class Positions(nn.Module):  # positions from a layer, as in RePo
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 3)

        def __call__(self, h, rotate):
            return loss(x, self.proj(h).transpose(0, 2, 1) * 100.0, rotate)

    mx.random.seed(0)
    module, h = Positions(), mx.random.normal((2, 17, 64))
    (_, ours), (_, theirs) = (
        nn.value_and_grad(module, lambda m, r: m(h, r))(module, r) for r in (fused, plain)
    )
    for a, b in zip(tree_flatten(ours), tree_flatten(theirs)):
        assert mx.allclose(a[1], b[1], rtol=1e-4, atol=1e-3).item(), a[0]
    assert mx.abs(ours["proj"]["weight"]).max().item() > 1.0


def test_lora_trainer_learns_through_positions(fixture_path, tmp_path):
    """mlx-lm's LoRA trainer (compiled step, nn.value_and_grad): LoRA on gate_map
    only gets a gradient through d/dpositions, so it moving shows the VJP works."""
    model, _ = repo_mlx.load(str(fixture_path))
    model.freeze()
    config = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.gate_map"]}
    linear_to_lora_layers(model, len(model.layers), config)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all("gate_map.lora" in k for k in names)
    rng = np.random.default_rng(0)
    data = [(rng.integers(0, 318, 40).tolist(), 0) for _ in range(8)]
    args = TrainingArgs(
        batch_size=4, iters=2, steps_per_report=100, steps_per_eval=100,
        steps_per_save=100, adapter_file=str(tmp_path / "adapters.safetensors"),
    )  # fmt: skip
    train(model, optim.Adam(learning_rate=1e-2), data, args=args)
    moved = [
        mx.abs(layer.self_attn.gate_map.lora_b).max().item()
        for layer in model.layers
        if layer.self_attn.repo
    ]
    assert len(moved) == 3 and min(moved) > 0  # lora_b starts at zero




# --------------------------------------------------------- kernel fallback
# Off-Mac, each way a kernel can fail is simulated: _on_metal_gpu is made to
# say yes, so the dispatch takes the kernel path, and then mx.fast.metal_kernel
# (or what it returns) fails as it would on a Mac.
@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(rope, "_on_metal_gpu", lambda: True)
    rope._kernel.cache_clear()
    rope.set_kernels("on")
    yield monkeypatch
    rope._kernel.cache_clear()
    rope.metal_source.cache_clear()
    rope.set_kernels(os.environ.get("REPO_MLX_KERNELS", "1"))


def _rotate_and_grad():
    q, p, gq = inputs(1, 2, 3, 16, pmax=100.0)
    k = 0.5 * q
    fn = lambda a, b, z: rope.continuous_rope_qk(a, b, z, base=1e4)  # noqa: E731
    out, grads = mx.vjp(fn, [q, k, p], [gq, gq])
    mx.eval(out, grads)
    return [*out, *grads]


def _pure_results():
    before = rope._state["mode"]
    rope.set_kernels(False)
    try:
        return _rotate_and_grad()
    finally:
        rope.set_kernels(before)


class FakeKernel:
    """What mx.fast.metal_kernel returns, doing ``behaviour`` when called."""

    calls = []

    def __init__(self, behaviour, **spec):
        self.behaviour, self.spec = behaviour, spec

    def __call__(self, **launch):
        FakeKernel.calls.append((self.spec["name"], launch))
        return self.behaviour(self.spec["name"], launch)


def _fake_metal_kernel(behaviour):
    return lambda **spec: FakeKernel(behaviour, **spec)


def _pure_kernel(name, launch):  # a correct "kernel": the pure path
    fn = rope._forward if rope.KERNELS[name].kind == "forward" else rope._backward
    return list(fn(*launch["inputs"]))


def _zeros_kernel(name, launch):  # compiles, runs, computes nonsense
    return [mx.zeros(s, d) for s, d in zip(launch["output_shapes"], launch["output_dtypes"])]


def _raise(error):
    def behaviour(name, launch):
        raise error

    return behaviour


FAILURES = {
    # off-Mac mlx itself: the kernel call raises
    "no Metal back-end": (None, "RuntimeError: [metal_kernel] No Metal back-end"),
    "compile error": (
        _fake_metal_kernel(_raise(RuntimeError(
            "[metal::Device] Unable to build metal library from source\n"
            "error: use of undeclared identifier 'sincos'"))),  # fmt: skip
        "RuntimeError: [metal::Device] Unable to build metal library from source",
    ),
    "signature change": (
        lambda **spec: _raise(TypeError("metal_kernel(): incompatible function arguments"))(0, 0),
        "TypeError: metal_kernel(): incompatible function arguments",
    ),
    "call signature change": (
        _fake_metal_kernel(_raise(TypeError("__call__(): unexpected keyword argument 'template'"))),
        "TypeError: __call__(): unexpected keyword argument 'template'",
    ),
    "wrong result": (
        _fake_metal_kernel(_zeros_kernel),
        "ArithmeticError: repo_rope_forward output 0 is 1 (relative) from the pure path",
    ),
    "source missing": ("missing", "FileNotFoundError: metal/rope.metal is missing"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_kernel_failure_warns_once_and_falls_back(fake_gpu, failure):
    metal_kernel, cause = FAILURES[failure]
    want = _pure_results()
    if metal_kernel == "missing":
        fake_gpu.setattr(rope, "metal_source_path", lambda: None)
        rope.metal_source.cache_clear()
    elif metal_kernel is not None:
        fake_gpu.setattr(mx.fast, "metal_kernel", metal_kernel)
    assert rope._use_kernels(mx.zeros((1, 2, 3, 16)))  # the dispatch takes the kernels
    with pytest.warns(RuntimeWarning) as caught:
        got = _rotate_and_grad()
    (w,) = caught  # once, naming the cause and how to report it
    message = str(w.message)
    assert cause in message and "python -m repo_mlx.doctor" in message
    assert "REPO_MLX_KERNELS=0" in message
    assert rope._state["failure"] in message
    for a, b in zip(got, want):
        assert mx.array_equal(a, b)  # results stay those of the pure path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _rotate_and_grad()  # no second warning, still the pure path
    assert all(mx.array_equal(a, b) for a, b in zip(again, want))


def test_strict_mode_makes_a_failure_an_error(fake_gpu):
    rope.set_kernels("strict")
    with pytest.raises(rope.KernelError, match="No Metal back-end"):
        _rotate_and_grad()


def test_working_kernels_are_checked_once_then_used(fake_gpu):
    """With a kernel that works (here: the pure path behind mx.fast.metal_kernel's
    interface), the dispatch launches it: the first use of each instance runs a
    two-token check, later calls launch the kernel alone, silently."""
    fake_gpu.setattr(mx.fast, "metal_kernel", _fake_metal_kernel(_pure_kernel))
    FakeKernel.calls.clear()
    want = _pure_results()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _rotate_and_grad()
        _rotate_and_grad()
    assert all(mx.allclose(a, b, atol=1e-6).item() for a, b in zip(got, want))
    names = [(n, launch["inputs"][0].shape[2]) for n, launch in FakeKernel.calls]
    fwd, bwd = "repo_rope_forward", "repo_rope_backward"
    assert names == [(fwd, 2), (fwd, 3), (bwd, 2), (bwd, 3), (fwd, 3), (bwd, 3)]
    assert rope._state["failure"] is None


def _tiled_kernel(name, launch):
    # A plausible slip: query head h takes KV head h % Hkv (tile), not h // G.
    q, k = launch["inputs"][:2]
    B, Hq, N, D = q.shape
    G, H = Hq // k.shape[1], k.shape[1]

    def regroup(x, a, b):  # heads ordered (a, b) -> (b, a)
        return x.reshape(B, a, b, N, D).swapaxes(1, 2).reshape(B, Hq, N, D)

    inputs = list(launch["inputs"])
    for i in (0, 3)[: len(inputs) - 5]:
        inputs[i] = regroup(inputs[i], G, H)
    out = _pure_kernel(name, dict(launch, inputs=inputs))
    return [regroup(out[0], H, G), *out[1:]]


def _grouped_rotate_and_grad():
    k, p, gk = inputs(1, 2, 3, 16, pmax=100.0)
    q, _, gq = inputs(1, 4, 3, 16, seed=1)
    fn = lambda a, b, z: rope.continuous_rope_qk(a, b, z, base=1e4)  # noqa: E731
    out, grads = mx.vjp(fn, [q, k, p], [gq, gk])
    mx.eval(out, grads)
    return [*out, *grads]


def test_grouped_kernels_checked_as_their_own_instance(fake_gpu):
    """Grouped and ungrouped calls are separate kernel instances, each checked on
    first use; a kernel that groups query heads the wrong way fails that check."""
    fake_gpu.setattr(mx.fast, "metal_kernel", _fake_metal_kernel(_pure_kernel))
    FakeKernel.calls.clear()
    rope.set_kernels(False)
    want = _grouped_rotate_and_grad()
    rope.set_kernels("strict")
    _rotate_and_grad()
    got = _grouped_rotate_and_grad()
    assert all(mx.allclose(a, b, atol=1e-6).item() for a, b in zip(got, want))
    shapes = [(n[10:], launch["inputs"][0].shape[1:3]) for n, launch in FakeKernel.calls]
    assert shapes == [
        ("forward", (2, 2)), ("forward", (2, 3)), ("backward", (2, 2)), ("backward", (2, 3)),
        ("forward", (4, 2)), ("forward", (4, 3)), ("backward", (4, 2)), ("backward", (4, 3)),
    ]  # fmt: skip
    assert rope.kernel_state()["checked"] == 4
    assert FakeKernel.calls[-1][1]["grid"] == (32, 3, 2)  # a simdgroup per KV head's row

    # The tile slip is invisible without grouping, caught with it.
    fake_gpu.setattr(mx.fast, "metal_kernel", _fake_metal_kernel(_tiled_kernel))
    rope._kernel.cache_clear()
    rope.set_kernels("on")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _rotate_and_grad()
    with pytest.warns(RuntimeWarning, match="repo_rope_forward output 0 is .* 4 query and 2 KV"):
        got = _grouped_rotate_and_grad()
    assert all(mx.array_equal(a, b) for a, b in zip(got, want))


def test_kernels_off_never_builds_them(fake_gpu):
    fake_gpu.setattr(mx.fast, "metal_kernel", _fake_metal_kernel(_raise(AssertionError)))
    FakeKernel.calls.clear()
    rope.set_kernels(False)
    assert not rope._use_kernels(mx.zeros((1, 2, 3, 16)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _rotate_and_grad()
    assert FakeKernel.calls == []
    with pytest.raises(ValueError, match="1/on, 0/off or strict"):
        rope.set_kernels("maybe")


def test_environment_variable_sets_the_mode():
    probe = "from repo_mlx import rope; print(rope._state['mode'])"
    modes = {}
    for value in ("0", "1", "strict", " Strict ", "bogus"):
        done = subprocess.run(
            [sys.executable, "-c", probe], env={**os.environ, "REPO_MLX_KERNELS": value},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        modes[value] = done.stdout.strip()
        if value == "bogus":
            assert "REPO_MLX_KERNELS='bogus' is not 1, 0 or strict: using 1" in done.stderr
    assert modes == {"0": "off", "1": "on", "strict": "strict", " Strict ": "strict", "bogus": "on"}


def test_big_tensors_take_the_pure_path(fake_gpu):
    """The kernels index in 32 bits: tensors of 2**28 elements or more are not theirs."""
    fake_gpu.setattr(rope, "MAX_KERNEL_ELEMENTS", 97)
    assert rope._use_kernels(mx.zeros((1, 2, 3, 16)))
    assert not rope._use_kernels(mx.zeros((1, 2, 3, 16)), mx.zeros((1, 2, 3), mx.int32))
    assert not rope._use_kernels(mx.zeros((1, 2, 4, 16)))


# ------------------------------------------------------------------- Metal
# On a Mac these run the checks `python -m repo_mlx.doctor` runs (kernel_checks).
needs_metal = pytest.mark.skipif(
    not mx.metal.is_available(),
    reason="needs Apple-silicon Metal (mx.metal.is_available() is False); "
    "tests/test_metal_sources.py checks the kernel sources on the CPU instead",
)


@pytest.mark.metal
@needs_metal
@pytest.mark.parametrize("dtype", kc.DTYPES, ids=kc.dtype_name)
def test_metal_kernels_match_pure_path_and_float64(dtype):
    rows = kc.check_kernels(dtypes=[dtype])
    assert rows and all(r.status == "pass" for r in rows), rows


@pytest.mark.metal
@needs_metal
def test_metal_model_matches_official_fixture(fixture_path):
    (row,) = kc.check_model(mx.gpu, fixture_path)
    assert row.status == "pass", row
