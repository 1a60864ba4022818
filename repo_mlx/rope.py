# Rotary embedding by continuous, per-head positions (RePo, spec section 4).
#
# This file imports nothing but mlx: a converted folder carries a copy of it so
# that stock mlx-lm can run the model without repo_mlx installed.

import math
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


def _rotate(x, positions, inv_freq, attention_factor):
    angles = positions.astype(mx.float32)[..., None] * inv_freq
    cos = (mx.cos(angles) * attention_factor).astype(x.dtype)
    sin = (mx.sin(angles) * attention_factor).astype(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


_rotate_compiled = mx.compile(_rotate)


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
    """
    if (base is None) == (inv_freq is None):
        raise ValueError("continuous_rope needs exactly one of base and inv_freq.")
    if inv_freq is None:
        inv_freq = inv_frequencies(x.shape[-1], base)
    factor = mx.array(attention_factor, mx.float32)
    return _rotate_compiled(x, positions, inv_freq, factor)
