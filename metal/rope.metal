// Rotary embedding by continuous, per-head positions (RePo, spec section 4).
//
// repo_mlx/rope.py passes this whole file as the `header` of mx.fast.metal_kernel
// and a one-line body that calls one of the two kernels below;
// tests/metal_harness compiles the very same file as C++ to check it off-Mac.
//
// k and its cotangent gk are [B, H, N, D], q and gq [B, H * G, N, D], positions z
// [B, H, N], all with any strides; outputs are row-contiguous. Query heads
// h*G .. h*G + G-1 share KV head h's positions (grouped-query attention; G = 1
// without). Pairs are (i, i + D/2) ("rotate half"). Angles, cos, sin and sums are
// float32; cos and sin are rounded to T before rotating, as the official code
// casts them to the model dtype. H (KV heads), G and D are template constants
// (no division by H at run time, loops unroll).
// Offsets are 32-bit: the host launches only tensors under 2**28 elements.
// Inputs are generic pointers: mlx passes arrays of fewer than 8 elements in the
// constant address space and larger ones in device.

#include <metal_stdlib>
using namespace metal;

// The backward kernel runs one simdgroup per row: the host launches grid.x ==
// threadgroup.x == 32 (Apple GPUs run 32 lanes per simdgroup).
static constant constexpr int REPO_SIMD_WIDTH = 32;

// Offset of row (b, h, n) from mlx's strides.
inline int repo_row(const constant int64_t* s, int b, int h, int n) {
  return b * int(s[0]) + h * int(s[1]) + n * int(s[2]);
}

// factor * (cos, sin) of one angle, in float32.
inline float2 repo_cos_sin(float angle, float factor) {
  float c;
  float s = metal::precise::sincos(angle, c);
  return float2(c, s) * factor;
}

// Rotate pair j of x (row at r, step t along D) by (c, s), already rounded to T,
// into out[o] and out[o + D/2].
template <typename T, int D, typename X>
inline void repo_rotate(X x, int r, int t, int j, float c, float s, device T* out, int o) {
  float x1 = float(x[r + j * t]), x2 = float(x[r + (j + D / 2) * t]);
  out[o] = T(x1 * c - x2 * s);
  out[o + D / 2] = T(x2 * c + x1 * s);
}

// Backward of one pair: dx = rotate(g, -angle) into dx[o], dx[o + D/2] (cos and
// sin rounded to T, as forward); returns d out / d angle . g = out1 * g2 - out2 * g1
// with out recomputed in float32 from x.
template <typename T, int D, typename X, typename G>
inline float repo_pair_grad(
    X x, int xr, int xt, G g, int gr, int gt, int j, float2 cs, device T* dx, int o) {
  float c = float(T(cs.x)), s = float(T(cs.y));
  float x1 = float(x[xr + j * xt]), x2 = float(x[xr + (j + D / 2) * xt]);
  float g1 = float(g[gr + j * gt]), g2 = float(g[gr + (j + D / 2) * gt]);
  dx[o] = T(g1 * c + g2 * s);
  dx[o + D / 2] = T(g2 * c - g1 * s);
  return (x1 * cs.x - x2 * cs.y) * g2 - (x2 * cs.x + x1 * cs.y) * g1;
}

// Forward of k and the G query heads of its group, cos and sin once. Grid
// (D/2, N, B*H): one thread per pair of a KV head.
template <typename T, int H, int G, int D, typename Q, typename K, typename Z, typename F>
inline void repo_rope_forward(
    Q q, const constant int* q_shape, const constant int64_t* q_strides,
    K k, const constant int64_t* k_strides, Z z, const constant int64_t* z_strides,
    F inv_freq, const constant int64_t* inv_freq_strides, float factor,
    device T* q_out, device T* k_out, uint3 pos) {
  const int j = pos.x, n = pos.y, b = pos.z / H, h = pos.z % H, N = q_shape[2];
  const float w = float(inv_freq[j * int(inv_freq_strides[0])]);
  float2 cs = repo_cos_sin(float(z[repo_row(z_strides, b, h, n)]) * w, factor);
  float c = float(T(cs.x)), s = float(T(cs.y));
  for (int g = 0; g < G; ++g) {
    const int hq = h * G + g;
    const int o = ((b * H * G + hq) * N + n) * D + j;
    repo_rotate<T, D>(q, repo_row(q_strides, b, hq, n), int(q_strides[3]), j, c, s, q_out, o);
  }
  const int o = (int(pos.z) * N + n) * D + j;
  repo_rotate<T, D>(k, repo_row(k_strides, b, h, n), int(k_strides[3]), j, c, s, k_out, o);
}

// Backward: dq, dk, and dz summed over k and its group's G query heads. Grid
// (32, N, B*H), threadgroup (32, *, 1): the 32 lanes of a simdgroup share one
// row of a KV head, lane l takes pairs l, l + 32, ...; their d/dz shares meet in
// simd_sum.
template <
    typename T, typename P, int H, int G, int D, typename Q, typename K, typename Z,
    typename GQ, typename GK, typename F>
inline void repo_rope_backward(
    Q q, const constant int* q_shape, const constant int64_t* q_strides,
    K k, const constant int64_t* k_strides, Z z, const constant int64_t* z_strides,
    GQ gq, const constant int64_t* gq_strides, GK gk, const constant int64_t* gk_strides,
    F inv_freq, const constant int64_t* inv_freq_strides, float factor,
    device T* dq, device T* dk, device P* dz, uint3 pos) {
  const int n = pos.y, b = pos.z / H, h = pos.z % H, N = q_shape[2];
  const float p = float(z[repo_row(z_strides, b, h, n)]);
  const int qt = int(q_strides[3]), gqt = int(gq_strides[3]);
  const int kr = repo_row(k_strides, b, h, n), kt = int(k_strides[3]);
  const int gkr = repo_row(gk_strides, b, h, n), gkt = int(gk_strides[3]);
  const int wt = int(inv_freq_strides[0]), row = (int(pos.z) * N + n) * D;
  float sum = 0.0f;
  for (int j = pos.x; j < D / 2; j += REPO_SIMD_WIDTH) {
    const float w = float(inv_freq[j * wt]);
    const float2 cs = repo_cos_sin(p * w, factor);
    float t = 0.0f;
    for (int g = 0; g < G; ++g) {
      const int hq = h * G + g, qrow = ((b * H * G + hq) * N + n) * D;
      t += repo_pair_grad<T, D>(
          q, repo_row(q_strides, b, hq, n), qt, gq, repo_row(gq_strides, b, hq, n), gqt, j, cs,
          dq, qrow + j);
    }
    t += repo_pair_grad<T, D>(k, kr, kt, gk, gkr, gkt, j, cs, dk, row + j);
    sum += w * t;
  }
  sum = simd_sum(sum);
  if (pos.x == 0) {
    dz[int(pos.z) * N + n] = P(sum);
  }
}
