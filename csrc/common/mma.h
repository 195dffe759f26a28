// 16x16x16 matrix products on shared memory tiles, the only way kernels reach tensor cores, so that the same
// kernel source runs under the host emulation (csrc/simt). Include after common/cuda_compat.h.
//
//   FragA<T, Layout>, FragB<T, Layout>  16x16 input tiles of T (float, __half, __nv_bfloat16), row_major or
//                                       col_major in memory with leading dimension ld (in elements)
//   Acc<T>                              16x16 float accumulator for products of T
//   load(frag, ptr, ld)                 A or B tile from memory
//   fill(acc, v), load_acc(acc, ptr, ld), store_acc(ptr, ld, acc)   accumulator from / to row-major float memory
//   mma(acc, a, b)                      acc += a * b
//
// Every call is warp-collective (all 32 lanes of a warp, blocks one-dimensional), like nvcuda::wmma. For
// T = __half or __nv_bfloat16 these are the WMMA API (sm_70+ for half, sm_80+ for bf16): on a GPU the tensor
// cores, under the emulation its host implementation (csrc/simt/simt_wmma.h), so the emulated tests run this
// branch too. For float a portable version does the same arithmetic with FMAs: each lane owns 8 accumulator
// elements, and an input fragment records its address and is read when mma runs, so the memory behind a fragment
// must not change between load and mma (true for WMMA code that follows the usual load-then-mma pattern between
// barriers). Pointers must be 32-byte aligned and ld a multiple of 8 (WMMA rule; the emulation checks it).
#pragma once

#include <type_traits>

#include "common/cuda_compat.h"

#ifdef VARCORE_SIMT
#include "simt/simt_wmma.h"
#else
#include <mma.h>
#endif

namespace varcore::mma {

struct row_major {};
struct col_major {};

VC_HOST_DEVICE __forceinline__ float to_float(float x) { return x; }
VC_HOST_DEVICE __forceinline__ float to_float(__half x) { return __half2float(x); }
VC_HOST_DEVICE __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
VC_HOST_DEVICE __forceinline__ T from_float(float x);
template <>
VC_HOST_DEVICE __forceinline__ float from_float<float>(float x) { return x; }
template <>
VC_HOST_DEVICE __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
VC_HOST_DEVICE __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- portable fragments ----------------------------------------------------------------------------------------

template <class T, class Layout>
struct PortableIn {
  const T* p;
  int ld;
  VC_DEVICE_INLINE float at(int r, int c) const {
    if constexpr (std::is_same_v<Layout, row_major>) return to_float(p[r * ld + c]);
    return to_float(p[c * ld + r]);
  }
};

// Lane l owns elements e = l + 32 i (i < 8) of the row-major 16x16 tile: row e / 16, column e % 16.
struct PortableAcc {
  float x[8];
};

VC_DEVICE_INLINE int lane_id() { return static_cast<int>(threadIdx.x % 32); }

template <class T, class Layout>
VC_DEVICE_INLINE void load(PortableIn<T, Layout>& f, const T* p, int ld) {
  f.p = p;
  f.ld = ld;
}

VC_DEVICE_INLINE void fill(PortableAcc& acc, float v) {
#pragma unroll
  for (int i = 0; i < 8; ++i) acc.x[i] = v;
}

VC_DEVICE_INLINE void load_acc(PortableAcc& acc, const float* p, int ld) {
  const int lane = lane_id();
#pragma unroll
  for (int i = 0; i < 8; ++i) acc.x[i] = p[(lane / 16 + 2 * i) * ld + lane % 16];
}

VC_DEVICE_INLINE void store_acc(float* p, int ld, const PortableAcc& acc) {
  const int lane = lane_id();
#pragma unroll
  for (int i = 0; i < 8; ++i) p[(lane / 16 + 2 * i) * ld + lane % 16] = acc.x[i];
}

template <class T, class LA, class LB>
VC_DEVICE_INLINE void mma(PortableAcc& acc, const PortableIn<T, LA>& a, const PortableIn<T, LB>& b) {
  const int lane = lane_id();
  const int col = lane % 16;
  float bcol[16];
#pragma unroll
  for (int k = 0; k < 16; ++k) bcol[k] = b.at(k, col);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int row = lane / 16 + 2 * i;
    float s = acc.x[i];
#pragma unroll
    for (int k = 0; k < 16; ++k) s = fmaf(a.at(row, k), bcol[k], s);
    acc.x[i] = s;
  }
}

template <class T, class Layout>
struct Frags {
  using A = PortableIn<T, Layout>;
  using B = PortableIn<T, Layout>;
};
template <class T>
struct AccOf {
  using type = PortableAcc;
};

// ---- WMMA (16-bit inputs) ---------------------------------------------------------------------------------------
namespace wm = nvcuda::wmma;

template <class Layout>
using wmma_layout = std::conditional_t<std::is_same_v<Layout, row_major>, wm::row_major, wm::col_major>;
using WmmaAcc = wm::fragment<wm::accumulator, 16, 16, 16, float>;

#define VARCORE_MMA_WMMA_TYPE(T)                                                          \
  template <class Layout>                                                                 \
  struct Frags<T, Layout> {                                                               \
    using A = wm::fragment<wm::matrix_a, 16, 16, 16, T, wmma_layout<Layout>>;             \
    using B = wm::fragment<wm::matrix_b, 16, 16, 16, T, wmma_layout<Layout>>;             \
  };                                                                                      \
  template <>                                                                             \
  struct AccOf<T> {                                                                       \
    using type = WmmaAcc;                                                                 \
  };
VARCORE_MMA_WMMA_TYPE(__half)
VARCORE_MMA_WMMA_TYPE(__nv_bfloat16)
#undef VARCORE_MMA_WMMA_TYPE

template <class Use, class T, class L>
VC_DEVICE_INLINE void load(wm::fragment<Use, 16, 16, 16, T, L>& f, const T* p, int ld) {
  wm::load_matrix_sync(f, p, ld);
}
VC_DEVICE_INLINE void fill(WmmaAcc& acc, float v) { wm::fill_fragment(acc, v); }
VC_DEVICE_INLINE void load_acc(WmmaAcc& acc, const float* p, int ld) {
  wm::load_matrix_sync(acc, p, ld, wm::mem_row_major);
}
VC_DEVICE_INLINE void store_acc(float* p, int ld, const WmmaAcc& acc) {
  wm::store_matrix_sync(p, acc, ld, wm::mem_row_major);
}
template <class T, class LA, class LB>
VC_DEVICE_INLINE void mma(WmmaAcc& acc, const wm::fragment<wm::matrix_a, 16, 16, 16, T, LA>& a,
                          const wm::fragment<wm::matrix_b, 16, 16, 16, T, LB>& b) {
  wm::mma_sync(acc, a, b, acc);
}

template <class T, class Layout>
using FragA = typename Frags<T, Layout>::A;
template <class T, class Layout>
using FragB = typename Frags<T, Layout>::B;
template <class T>
using Acc = typename AccOf<T>::type;

}  // namespace varcore::mma
