// Rotary embedding by continuous, per-head positions (RePo, spec section 4).
//
// repo_mlx/rope.py passes this whole file as the `header` of mx.fast.metal_kernel
// and a one-line body that calls one of the four kernels at the bottom;
// tests/metal_harness compiles the very same file as C++ to check it off-Mac.
//
// Shapes: x, q, k and the cotangents g are [B, H, N, D] with any strides (read
// through *_strides), positions z are [B, H, N] with any strides; every output
// is row-contiguous. Pairs are (i, i + D/2) ("rotate half"). Angles, cos, sin
// and sums are float32; cos and sin are rounded to the value type T before
// rotating, as the official code casts them to the model dtype.
// Inputs are generic pointers because mlx passes arrays of fewer than 8
// elements in the constant address space and larger ones in device.

#include <metal_stdlib>
using namespace metal;

// One simdgroup per row in the backward kernels: the host launches grid.x ==
// threadgroup.x == REPO_SIMD_WIDTH (Apple GPUs run 32 lanes per simdgroup).
static constant constexpr int REPO_SIMD_WIDTH = 32;

// Element offset of row (b, h, n) from 4 (or 3) strides.
inline int64_t repo_row(const constant int64_t* strides, uint b, uint h, uint n) {
  return int64_t(b) * strides[0] + int64_t(h) * strides[1] + int64_t(n) * strides[2];
}

// attention_factor * (cos, sin) of one angle, in float32.
inline float2 repo_cos_sin(float angle, float factor) {
  return float2(metal::precise::cos(angle), metal::precise::sin(angle)) * factor;
}

// Rotate pair k of one row by (c, s), already rounded to T, into out[o], out[o + half_dim].
template <typename T, typename X>
inline void repo_rotate_pair(
    X x, int64_t i, int64_t step, float c, float s, device T* out, int64_t o, int half_dim) {
  float x1 = float(x[i]);
  float x2 = float(x[i + int64_t(half_dim) * step]);
  out[o] = T(x1 * c - x2 * s);
  out[o + half_dim] = T(x2 * c + x1 * s);
}

// Backward for pair k of one row: dx = rotate(g, -angle) into dx[o], dx[o + half_dim]
// (cos and sin rounded to T, as forward), and returns d out / d angle . g =
// out1 * g2 - out2 * g1, with out recomputed in float32 from x.
template <typename T, typename X, typename G>
inline float repo_pair_grad(
    X x, int64_t xi, int64_t xstep, G g, int64_t gi, int64_t gstep,
    float2 cs, device T* dx, int64_t o, int half_dim) {
  float c = float(T(cs.x)), s = float(T(cs.y));
  float x1 = float(x[xi]), x2 = float(x[xi + int64_t(half_dim) * xstep]);
  float g1 = float(g[gi]), g2 = float(g[gi + int64_t(half_dim) * gstep]);
  dx[o] = T(g1 * c + g2 * s);
  dx[o + half_dim] = T(g2 * c - g1 * s);
  float out1 = x1 * cs.x - x2 * cs.y;
  float out2 = x2 * cs.x + x1 * cs.y;
  return out1 * g2 - out2 * g1;
}

// Forward, one tensor. Grid (D/2, N, B*H): one thread per pair.
template <typename T, typename X, typename Z, typename F>
inline void repo_rope_forward(
    X x, const constant int* x_shape, const constant int64_t* x_strides,
    Z z, const constant int64_t* z_strides,
    F inv_freq, float factor, device T* out, uint3 pos) {
  const int H = x_shape[1], N = x_shape[2], half_dim = x_shape[3] / 2;
  const uint k = pos.x, n = pos.y, b = pos.z / H, h = pos.z % H;
  float2 cs = repo_cos_sin(float(z[repo_row(z_strides, b, h, n)]) * inv_freq[k], factor);
  float c = float(T(cs.x)), s = float(T(cs.y));
  int64_t o = (int64_t(pos.z) * N + n) * (2 * half_dim) + k;
  repo_rotate_pair(
      x, repo_row(x_strides, b, h, n) + k * x_strides[3], x_strides[3], c, s, out, o, half_dim);
}

// Forward, queries and keys of the same heads in one launch: cos and sin once.
template <typename T, typename Q, typename K, typename Z, typename F>
inline void repo_rope_qk_forward(
    Q q, const constant int* q_shape, const constant int64_t* q_strides,
    K k, const constant int64_t* k_strides,
    Z z, const constant int64_t* z_strides,
    F inv_freq, float factor, device T* q_out, device T* k_out, uint3 pos) {
  const int H = q_shape[1], N = q_shape[2], half_dim = q_shape[3] / 2;
  const uint j = pos.x, n = pos.y, b = pos.z / H, h = pos.z % H;
  float2 cs = repo_cos_sin(float(z[repo_row(z_strides, b, h, n)]) * inv_freq[j], factor);
  float c = float(T(cs.x)), s = float(T(cs.y));
  int64_t o = (int64_t(pos.z) * N + n) * (2 * half_dim) + j;
  repo_rotate_pair(
      q, repo_row(q_strides, b, h, n) + j * q_strides[3], q_strides[3], c, s, q_out, o, half_dim);
  repo_rotate_pair(
      k, repo_row(k_strides, b, h, n) + j * k_strides[3], k_strides[3], c, s, k_out, o, half_dim);
}

// Backward, one tensor. Grid (32, N, B*H), threadgroup (32, *, 1): the 32 lanes
// of a simdgroup share one row, lane l takes pairs l, l + 32, ...; their
// d/dz shares meet in simd_sum.
template <typename T, typename P, typename X, typename Z, typename G, typename F>
inline void repo_rope_backward(
    X x, const constant int* x_shape, const constant int64_t* x_strides,
    Z z, const constant int64_t* z_strides,
    G g, const constant int64_t* g_strides,
    F inv_freq, float factor, device T* dx, device P* dz, uint3 pos) {
  const int H = x_shape[1], N = x_shape[2], half_dim = x_shape[3] / 2;
  const uint n = pos.y, b = pos.z / H, h = pos.z % H;
  const float p = float(z[repo_row(z_strides, b, h, n)]);
  const int64_t xr = repo_row(x_strides, b, h, n), gr = repo_row(g_strides, b, h, n);
  const int64_t row = (int64_t(pos.z) * N + n) * (2 * half_dim);
  float sum = 0.0f;
  for (int j = pos.x; j < half_dim; j += REPO_SIMD_WIDTH) {
    float w = inv_freq[j];
    float2 cs = repo_cos_sin(p * w, factor);
    sum += w * repo_pair_grad(
        x, xr + j * x_strides[3], x_strides[3], g, gr + j * g_strides[3], g_strides[3],
        cs, dx, row + j, half_dim);
  }
  sum = simd_sum(sum);
  if (pos.x == 0) {
    dz[int64_t(pos.z) * N + n] = P(sum);
  }
}

// Backward of repo_rope_qk_forward: dq, dk, and dz summed over both.
template <
    typename T, typename P, typename Q, typename K, typename Z, typename GQ, typename GK,
    typename F>
inline void repo_rope_qk_backward(
    Q q, const constant int* q_shape, const constant int64_t* q_strides,
    K k, const constant int64_t* k_strides,
    Z z, const constant int64_t* z_strides,
    GQ gq, const constant int64_t* gq_strides,
    GK gk, const constant int64_t* gk_strides,
    F inv_freq, float factor, device T* dq, device T* dk, device P* dz, uint3 pos) {
  const int H = q_shape[1], N = q_shape[2], half_dim = q_shape[3] / 2;
  const uint n = pos.y, b = pos.z / H, h = pos.z % H;
  const float p = float(z[repo_row(z_strides, b, h, n)]);
  const int64_t qr = repo_row(q_strides, b, h, n), kr = repo_row(k_strides, b, h, n);
  const int64_t gqr = repo_row(gq_strides, b, h, n), gkr = repo_row(gk_strides, b, h, n);
  const int64_t row = (int64_t(pos.z) * N + n) * (2 * half_dim);
  float sum = 0.0f;
  for (int j = pos.x; j < half_dim; j += REPO_SIMD_WIDTH) {
    float w = inv_freq[j];
    float2 cs = repo_cos_sin(p * w, factor);
    float t = repo_pair_grad(
        q, qr + j * q_strides[3], q_strides[3], gq, gqr + j * gq_strides[3], gq_strides[3],
        cs, dq, row + j, half_dim);
    t += repo_pair_grad(
        k, kr + j * k_strides[3], k_strides[3], gk, gkr + j * gk_strides[3], gk_strides[3],
        cs, dk, row + j, half_dim);
    sum += w * t;
  }
  sum = simd_sum(sum);
  if (pos.x == 0) {
    dz[int64_t(pos.z) * N + n] = P(sum);
  }
}
