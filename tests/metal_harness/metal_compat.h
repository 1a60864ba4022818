// Just enough of the Metal Shading Language, as C++17 for g++, to run the
// kernels of metal/*.metal on the CPU: the types, math and attributes they use,
// plus a driver that runs every thread of a grid the way mx.fast.metal_kernel
// dispatches it. Reached through `#include <metal_stdlib>` (see metal_stdlib).
//
// Semantics mirrored: float16_t/half is IEEE binary16 (_Float16) and
// bfloat16_t/bfloat keeps the top 16 bits of a float, both rounded to nearest
// even from float; metal::precise::cos/sin/sincos are the C library's float cos/sin;
// simd_sum adds the values of the active lanes of a 32-lane simdgroup, whose
// lanes run as coroutines that meet at each simd_sum.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <vector>

typedef unsigned int uint;  // as glibc's <sys/types.h> has it

namespace metal {

struct uint3 {
  uint x, y, z;
};

struct float2 {
  float x, y;
  float2() = default;
  constexpr float2(float a, float b) : x(a), y(b) {}
};
inline float2 operator*(float2 a, float s) {
  return float2(a.x * s, a.y * s);
}

typedef _Float16 half_t;

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // to nearest even
    }
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
static_assert(sizeof(bfloat) == 2, "bfloat must be 2 bytes, like mlx's bfloat16");

namespace precise {
inline float cos(float x) {
  return std::cos(x);
}
inline float sin(float x) {
  return std::sin(x);
}
// Metal: T sincos(T x, thread T& cosval), returns the sine.
inline float sincos(float x, float& cosval) {
  cosval = std::cos(x);
  return std::sin(x);
}
}  // namespace precise

float simd_sum(float value);

}  // namespace metal

// mlx's kernel prelude (metal/kernels/utils.h) names the types this way.
typedef _Float16 float16_t;
typedef metal::bfloat bfloat16_t;

namespace harness {

constexpr int kSimdWidth = 32;

using metal::uint3;

// The thread-position attributes mx.fast.metal_kernel can hand a kernel.
struct ThreadInfo {
  uint3 thread_position_in_grid, thread_position_in_threadgroup,
      threadgroup_position_in_grid, threads_per_threadgroup, threads_per_grid,
      threadgroups_per_grid, grid_size, grid_origin, dispatch_threads_per_threadgroup;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup,
      simdgroup_index_in_threadgroup, simdgroups_per_threadgroup,
      dispatch_simdgroups_per_threadgroup, threads_per_simdgroup,
      thread_execution_width;
};

// One simdgroup in flight: its lanes are coroutines switched on one OS thread.
struct SimdGroup {
  ucontext_t main;
  ucontext_t lanes[kSimdWidth];
  bool live[kSimdWidth], waiting[kSimdWidth];
  float value[kSimdWidth];
  float result;
  int current;
  const std::function<void(int)>* body;
};

inline SimdGroup*& active() {
  static thread_local SimdGroup* group = nullptr;
  return group;
}

inline void lane_entry() {
  SimdGroup* g = active();
  int lane = g->current;
  (*g->body)(lane);
  g->live[lane] = false;  // returns to g->main through uc_link
}

// Run lanes 0..n-1 of one simdgroup to completion. A lane runs until it
// returns or reaches simd_sum; once every live lane is parked at simd_sum they
// all get the sum of the parked values (lanes that returned are inactive).
inline void run_simdgroup(int n, const std::function<void(int)>& body) {
  static std::vector<char> stacks(size_t(kSimdWidth) << 17);
  SimdGroup g;
  g.body = &body;
  SimdGroup* outer = active();
  active() = &g;
  for (int l = 0; l < n; ++l) {
    getcontext(&g.lanes[l]);
    g.lanes[l].uc_stack.ss_sp = stacks.data() + (size_t(l) << 17);
    g.lanes[l].uc_stack.ss_size = size_t(1) << 17;
    g.lanes[l].uc_link = &g.main;
    makecontext(&g.lanes[l], lane_entry, 0);
    g.live[l] = true;
  }
  for (;;) {
    int parked = 0, running = 0;
    float sum = 0.0f;
    for (int l = 0; l < n; ++l) {
      if (!g.live[l]) continue;
      g.current = l;
      g.waiting[l] = false;
      swapcontext(&g.main, &g.lanes[l]);
    }
    for (int l = 0; l < n; ++l) {
      if (!g.live[l]) continue;
      ++running;
      if (g.waiting[l]) {
        ++parked;
        sum += g.value[l];
      }
    }
    if (running == 0) break;
    if (parked != running) throw std::logic_error("simd_sum: lanes diverged");
    g.result = sum;
  }
  active() = outer;
}

inline uint3 min3(uint3 a, uint3 b) {
  return {std::min(a.x, b.x), std::min(a.y, b.y), std::min(a.z, b.z)};
}

// dispatchThreads(grid, threadgroup) as mx.fast.metal_kernel issues it: the
// threadgroup is clipped to the grid, edge threadgroups are partial, threads
// are linearised x-fastest and cut into simdgroups of 32.
inline void run_grid(
    uint3 grid, uint3 group, const std::function<void(const ThreadInfo&)>& thread) {
  group = min3(group, grid);
  const uint3 groups = {
      (grid.x + group.x - 1) / group.x, (grid.y + group.y - 1) / group.y,
      (grid.z + group.z - 1) / group.z};
  for (uint gz = 0; gz < groups.z; ++gz)
    for (uint gy = 0; gy < groups.y; ++gy)
      for (uint gx = 0; gx < groups.x; ++gx) {
        const uint3 origin = {gx * group.x, gy * group.y, gz * group.z};
        const uint3 size =
            min3(group, {grid.x - origin.x, grid.y - origin.y, grid.z - origin.z});
        const uint count = size.x * size.y * size.z;
        const uint simdgroups = (count + kSimdWidth - 1) / kSimdWidth;
        for (uint s = 0; s < simdgroups; ++s) {
          const int lanes = int(std::min<uint>(kSimdWidth, count - s * kSimdWidth));
          run_simdgroup(lanes, [&](int lane) {
            ThreadInfo t;
            const uint i = s * kSimdWidth + uint(lane);
            t.thread_position_in_threadgroup = {
                i % size.x, (i / size.x) % size.y, i / (size.x * size.y)};
            t.thread_position_in_grid = {
                origin.x + t.thread_position_in_threadgroup.x,
                origin.y + t.thread_position_in_threadgroup.y,
                origin.z + t.thread_position_in_threadgroup.z};
            t.threadgroup_position_in_grid = {gx, gy, gz};
            t.threads_per_threadgroup = size;
            t.dispatch_threads_per_threadgroup = group;
            t.threads_per_grid = grid;
            t.grid_size = grid;
            t.grid_origin = {0, 0, 0};
            t.threadgroups_per_grid = groups;
            t.thread_index_in_threadgroup = i;
            t.thread_index_in_simdgroup = uint(lane);
            t.simdgroup_index_in_threadgroup = s;
            t.simdgroups_per_threadgroup = simdgroups;
            t.dispatch_simdgroups_per_threadgroup =
                (group.x * group.y * group.z + kSimdWidth - 1) / kSimdWidth;
            t.threads_per_simdgroup = kSimdWidth;
            t.thread_execution_width = kSimdWidth;
            thread(t);
          });
        }
      }
}

}  // namespace harness

inline float metal::simd_sum(float value) {
  harness::SimdGroup* g = harness::active();
  const int lane = g->current;
  g->value[lane] = value;
  g->waiting[lane] = true;
  swapcontext(&g->lanes[lane], &g->main);
  return g->result;
}

// Metal's address-space qualifiers have no C++ meaning; defined last so that
// no standard header above sees them (std::thread and friends).
#define device
#define constant
#define thread
#define threadgroup
// half and bfloat are type keywords in Metal: as macros for qualified names
// they still work as types, and a variable named half or bfloat fails here too.
#define half ::metal::half_t
#define bfloat ::metal::bfloat
