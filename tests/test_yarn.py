"""YaRN as the paper used it: every layer, RePo layers included (spec section 7)."""

import math

import mlx.core as mx
import numpy as np
import pytest

import repo_mlx
from repo_mlx import rope
from repo_mlx import LoadError
from repo_mlx import yarn_scaling


def yarn_reference(head_dim, base, factor, original=4096, beta_fast=32.0, beta_slow=1.0):
    """float64 YaRN, written from HF transformers' _compute_yarn_parameters."""

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # share of the original (extrapolated) frequency
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq, 0.1 * math.log(factor) + 1.0


def rotate_reference(x, positions, inv_freq, attention_factor):
    """float64 rotate-half rotation of x [..., N, D] by positions [..., N]."""
    angles = positions[..., None] * inv_freq
    cos, sin = np.cos(angles) * attention_factor, np.sin(angles) * attention_factor
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize(
    "head_dim, base, factor",
    [(128, 500000.0, 2.0), (128, 500000.0, 4.0), (16, 500000.0, 4.0), (64, 10000.0, 8.0)],
)
def test_yarn_parameters_match_the_formula(head_dim, base, factor):
    inv_freq, attention_factor = rope.yarn_parameters(head_dim, base, factor)
    ref, ref_factor = yarn_reference(head_dim, base, factor)
    np.testing.assert_allclose(np.array(inv_freq), ref, rtol=2e-6)
    assert attention_factor == pytest.approx(ref_factor, abs=1e-12)
    # The blend really interpolates: some frequencies kept, some divided by the factor.
    original = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    assert np.isclose(ref, original).any() and np.isclose(ref, original / factor).any()


def test_reference_ramp_on_the_release_shape():
    # 1B: head_dim 128, theta 500000, 4096 -> ramp from dim 14 to 32, worked out by hand.
    ref, _ = yarn_reference(128, 500000.0, 2.0)
    original = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(ref[:15], original[:15])
    np.testing.assert_allclose(ref[32:], original[32:] / 2)
    np.testing.assert_allclose(ref[23], original[23] * (1 - 0.5) + original[23] / 2 * 0.5)


@pytest.fixture(scope="module")
def yarn_model(fixture_path):
    model, _ = repo_mlx.load(str(fixture_path), model_config=yarn_scaling(4))
    return model


def test_every_layer_uses_yarn(yarn_model):
    args = yarn_model.args
    head_dim = args.hidden_size // args.num_attention_heads
    ref, ref_factor = yarn_reference(head_dim, args.rope_theta, 4.0)
    assert args.max_position_embeddings == 4 * 4096
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, args.num_attention_heads, 20, head_dim)).astype(np.float32)
    for offset in (0, 37, 9000):
        z = np.broadcast_to(offset + np.arange(20, dtype=np.float64), (1, args.num_attention_heads, 20))
        expected = rotate_reference(x.astype(np.float64), z, ref, ref_factor)
        for i, layer in enumerate(yarn_model.layers):
            attn = layer.self_attn
            if attn.repo:
                # The continuous-position path with the layer's own YaRN parameters.
                got = rope.continuous_rope(
                    mx.array(x),
                    mx.array(z.astype(np.float32)),
                    inv_freq=attn._inv_freq,
                    attention_factor=attn._attention_factor,
                )
            else:
                got = attn.rope(mx.array(x), offset=offset)  # mlx-lm's YarnRoPE
            # float32 angles at position ~9000 carry about 1e-3 absolute error.
            np.testing.assert_allclose(np.array(got), expected, atol=3e-3, err_msg=f"layer {i}")


def test_yarn_factor_below_one_is_refused():
    with pytest.raises(LoadError, match="must be from 1 to 4096"):
        yarn_scaling(0.5)
