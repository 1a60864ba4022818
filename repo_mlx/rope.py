# Rotary embedding by continuous, per-head positions (RePo, spec section 4).
#
# This file imports nothing but mlx and the standard library: a converted folder
# carries a copy of it so that stock mlx-lm can run the model without repo_mlx
# installed. There the Metal sources are absent and the pure-MLX path runs.
#
# Both paths are mx.custom_function's with a hand-written VJP (training needs
# d/dpositions): on a Metal GPU they launch the kernels of metal/rope.metal,
# elsewhere they run the same math as compiled MLX ops.

import functools
import math
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx


def inv_frequencies(head_dim: int, base: float) -> mx.array:
    """``1 / base ** (2k / head_dim)`` in float32, as the official code builds it."""
    exponent = mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim
    return 1.0 / (mx.array(base, mx.float32) ** exponent)


def yarn_parameters(
    head_dim: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int = 4096,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> Tuple[mx.array, float]:
    """YaRN's blended inverse frequencies and its cos/sin factor (HF's formula)."""

    def correction_dim(rotations):
        return (
            head_dim
            * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(base))
        )

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(head_dim // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = inv_frequencies(head_dim, base)
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


def rope_parameters(
    head_dim: int, base: float, rope_scaling: Optional[dict]
) -> Tuple[mx.array, float]:
    """Inverse frequencies and cos/sin factor for a config's ``rope_scaling``."""
    kind = (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type")
    if kind in (None, "default"):
        return inv_frequencies(head_dim, base), 1.0
    if kind == "yarn":
        keys = ("original_max_position_embeddings", "beta_fast", "beta_slow")
        extra = {k: rope_scaling[k] for k in keys if rope_scaling.get(k) is not None}
        return yarn_parameters(head_dim, base, rope_scaling["factor"], **extra)
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported for RePo layers; "
        "use 'yarn' (as the paper did) or none."
    )


def _cos_sin(positions, inv_freq, factor):
    angles = positions.astype(mx.float32)[..., None] * inv_freq
    return mx.cos(angles) * factor, mx.sin(angles) * factor


def _rotate_by(x, cos, sin):
    # cos and sin are cast to the model dtype just before rotating, as the official code does.
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _angle_grad(x, g, cos, sin):
    # d(out . g)/d(angle) per pair, in float32: out1 * g2 - out2 * g1.
    half = x.shape[-1] // 2
    x, g = x.astype(mx.float32), g.astype(mx.float32)
    x1, x2, g1, g2 = x[..., :half], x[..., half:], g[..., :half], g[..., half:]
    return (x1 * cos - x2 * sin) * g2 - (x2 * cos + x1 * sin) * g1


@mx.compile
def _rotate(x, positions, inv_freq, factor):
    return _rotate_by(x, *_cos_sin(positions, inv_freq, factor))


@mx.compile
def _rotate_qk(q, k, positions, inv_freq, factor):
    cos, sin = _cos_sin(positions, inv_freq, factor)
    return _rotate_by(q, cos, sin), _rotate_by(k, cos, sin)


@mx.compile
def _backward(x, positions, g, inv_freq, factor):
    cos, sin = _cos_sin(positions, inv_freq, factor)
    dx = _rotate_by(g, cos, -sin)  # rotate(g, -positions)
    t = _angle_grad(x, g, cos, sin)
    return dx, (t * inv_freq).sum(-1).astype(positions.dtype)


@mx.compile
def _backward_qk(q, k, positions, gq, gk, inv_freq, factor):
    cos, sin = _cos_sin(positions, inv_freq, factor)
    t = _angle_grad(q, gq, cos, sin) + _angle_grad(k, gk, cos, sin)
    dz = (t * inv_freq).sum(-1).astype(positions.dtype)
    return _rotate_by(gq, cos, -sin), _rotate_by(gk, cos, -sin), dz


def _frequency_grads(pairs, positions, inv_freq, factor):
    """Gradients for inv_freq and factor; lazy, so free unless someone asks for them."""
    cos, sin = _cos_sin(positions, inv_freq, mx.array(1.0, mx.float32))
    t = sum(_angle_grad(x, g, cos, sin) for x, g in pairs) * factor
    d_inv_freq = (t * positions.astype(mx.float32)[..., None]).reshape(-1, t.shape[-1]).sum(0)
    d_factor = sum((_rotate_by(x.astype(mx.float32), cos, sin) * g).sum() for x, g in pairs)
    return d_inv_freq, d_factor.astype(mx.float32)


# ---------------------------------------------------------------- Metal kernels
# name: (input names, output names, body). Each body is one call into
# metal/rope.metal, which goes in as the kernel header.
KERNELS = {
    "repo_rope_forward": (
        ("x", "z", "inv_freq", "factor"),
        ("out",),
        "repo_rope_forward<T>(x, x_shape, x_strides, z, z_strides, inv_freq, factor, "
        "out, thread_position_in_grid);",
    ),
    "repo_rope_qk_forward": (
        ("q", "k", "z", "inv_freq", "factor"),
        ("q_out", "k_out"),
        "repo_rope_qk_forward<T>(q, q_shape, q_strides, k, k_strides, z, z_strides, "
        "inv_freq, factor, q_out, k_out, thread_position_in_grid);",
    ),
    "repo_rope_backward": (
        ("x", "z", "g", "inv_freq", "factor"),
        ("dx", "dz"),
        "repo_rope_backward<T, P>(x, x_shape, x_strides, z, z_strides, g, g_strides, "
        "inv_freq, factor, dx, dz, thread_position_in_grid);",
    ),
    "repo_rope_qk_backward": (
        ("q", "k", "z", "gq", "gk", "inv_freq", "factor"),
        ("dq", "dk", "dz"),
        "repo_rope_qk_backward<T, P>(q, q_shape, q_strides, k, k_strides, z, z_strides, "
        "gq, gq_strides, gk, gk_strides, inv_freq, factor, dq, dk, dz, "
        "thread_position_in_grid);",
    ),
}
SIMD_WIDTH = 32  # lanes per simdgroup on Apple GPUs; the backward kernels rely on it
_KERNEL_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def metal_source_path() -> Optional[Path]:
    """Where metal/rope.metal is, or None where it is absent (a converted folder)."""
    here = Path(__file__).resolve().parent
    places = [here / "metal"]  # installed wheel: repo_mlx/metal/
    if here.name == "repo_mlx":
        places.append(here.parent / "metal")  # source checkout: <repo>/metal/
    return next((p / "rope.metal" for p in places if (p / "rope.metal").is_file()), None)


@functools.lru_cache(maxsize=None)
def metal_source() -> Optional[str]:
    path = metal_source_path()
    return path.read_text() if path else None


def _use_metal(*arrays) -> bool:
    # The kernels read any strides but want [B, H, N, D] and a GPU stream.
    x = arrays[0]
    return (
        x.ndim == 4
        and x.size > 0
        and all(a.dtype in _KERNEL_DTYPES for a in arrays)
        and mx.metal.is_available()
        and mx.default_device() == mx.gpu
        and metal_source() is not None
    )


@functools.lru_cache(maxsize=None)
def _kernel(name):
    inputs, outputs, body = KERNELS[name]
    return mx.fast.metal_kernel(
        name=name,
        input_names=inputs,
        output_names=outputs,
        source=body,
        header=metal_source(),
        ensure_row_contiguous=False,  # the kernels read strides: no copies of q/k views
    )


def launch(name, *inputs) -> dict:
    """Keyword arguments of kernel ``name``'s call (tests/metal_harness runs the same)."""
    *arrays, inv_freq, factor = inputs
    inputs = (*arrays, mx.contiguous(inv_freq), factor)
    x, z = arrays[0], arrays[2 if "_qk_" in name else 1]
    B, H, N, D = x.shape
    n = 2 if "_qk_" in name else 1
    if name.endswith("backward"):
        return dict(
            inputs=inputs,
            template=[("T", x.dtype), ("P", z.dtype)],
            grid=(SIMD_WIDTH, N, B * H),  # one simdgroup per row: sums meet in simd_sum
            threadgroup=(SIMD_WIDTH, 8, 1),
            output_shapes=[x.shape] * n + [z.shape],
            output_dtypes=[x.dtype] * n + [z.dtype],
        )
    tx = min(D // 2, 256)
    return dict(
        inputs=inputs,
        template=[("T", x.dtype)],
        grid=(D // 2, N, B * H),  # one thread per pair
        threadgroup=(tx, max(1, 256 // tx), 1),
        output_shapes=[x.shape] * n,
        output_dtypes=[x.dtype] * n,
    )


def _run(name, *inputs):
    return _kernel(name)(**launch(name, *inputs))


# ------------------------------------------------------------- differentiable ops
@mx.custom_function
def _rope(x, positions, inv_freq, factor):
    if _use_metal(x, positions):
        return _run("repo_rope_forward", x, positions, inv_freq, factor)[0]
    return _rotate(x, positions, inv_freq, factor)


@_rope.vjp
def _rope_vjp(primals, g, output):
    x, positions, inv_freq, factor = primals
    if _use_metal(x, positions, g):
        dx, dz = _run("repo_rope_backward", x, positions, g, inv_freq, factor)
    else:
        dx, dz = _backward(x, positions, g, inv_freq, factor)
    return (dx, dz, *_frequency_grads([(x, g)], positions, inv_freq, factor))


@mx.custom_function
def _rope_qk(q, k, positions, inv_freq, factor):
    if _use_metal(q, k, positions):
        return tuple(_run("repo_rope_qk_forward", q, k, positions, inv_freq, factor))
    return _rotate_qk(q, k, positions, inv_freq, factor)


@_rope_qk.vjp
def _rope_qk_vjp(primals, cotangents, outputs):
    q, k, positions, inv_freq, factor = primals
    gq, gk = cotangents
    args = (q, k, positions, gq, gk, inv_freq, factor)
    if _use_metal(q, k, positions, gq, gk):
        dq, dk, dz = _run("repo_rope_qk_backward", *args)
    else:
        dq, dk, dz = _backward_qk(*args)
    pairs = [(q, gq), (k, gk)]
    return (dq, dk, dz, *_frequency_grads(pairs, positions, inv_freq, factor))


def _arguments(x, positions, base, inv_freq, attention_factor):
    if (base is None) == (inv_freq is None):
        raise ValueError("continuous_rope needs exactly one of base and inv_freq.")
    if x.shape[-1] % 2:
        raise ValueError(f"head_dim must be even, got {x.shape[-1]}.")
    if inv_freq is None:
        inv_freq = inv_frequencies(x.shape[-1], base)
    if inv_freq.shape != (x.shape[-1] // 2,):
        raise ValueError(
            f"inv_freq must have shape ({x.shape[-1] // 2},) for head_dim "
            f"{x.shape[-1]}, got {tuple(inv_freq.shape)}."
        )
    if not mx.issubdtype(positions.dtype, mx.floating):
        positions = positions.astype(mx.float32)
    positions = mx.broadcast_to(positions, x.shape[:-1])
    factor = mx.array(attention_factor, mx.float32)
    return positions, inv_freq.astype(mx.float32), factor


def continuous_rope(
    x: mx.array,
    positions: mx.array,
    *,
    base: Optional[float] = None,
    inv_freq: Optional[mx.array] = None,
    attention_factor: float = 1.0,
) -> mx.array:
    """Rotate ``x`` [B, heads, N, head_dim] by real ``positions`` [B, heads, N].

    "Rotate half" layout (dims i and i + head_dim/2 pair up), angles in float32,
    result in ``x.dtype``. Give ``base`` (plain RoPE frequencies) or ``inv_freq``
    (e.g. YaRN's blend); ``attention_factor`` multiplies cos and sin.
    Differentiable in ``x`` and ``positions`` (the gradient comes back in the
    positions' dtype).
    """
    positions, inv_freq, factor = _arguments(
        x, positions, base, inv_freq, attention_factor
    )
    return _rope(x, positions, inv_freq, factor)


def continuous_rope_qk(
    queries: mx.array,
    keys: mx.array,
    positions: mx.array,
    *,
    base: Optional[float] = None,
    inv_freq: Optional[mx.array] = None,
    attention_factor: float = 1.0,
) -> Tuple[mx.array, mx.array]:
    """``continuous_rope`` of queries and keys with the same positions, in one pass.

    Query head h and key head h share ``positions[:, h]`` (RePo has no GQA), so
    cos and sin are computed once; on Metal it is a single kernel launch.
    """
    if queries.shape != keys.shape or queries.dtype != keys.dtype:
        kw = dict(base=base, inv_freq=inv_freq, attention_factor=attention_factor)
        return continuous_rope(queries, positions, **kw), continuous_rope(
            keys, positions, **kw
        )
    positions, inv_freq, factor = _arguments(
        queries, positions, base, inv_freq, attention_factor
    )
    return _rope_qk(queries, keys, positions, inv_freq, factor)
