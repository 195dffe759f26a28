// Device-side built-ins of the host emulation of CUDA: barriers, warp operations, atomics, math intrinsics and
// vector types. Include simt.h, not this file.
#pragma once

#include <math.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "simt_runtime.h"

inline constexpr int warpSize = 32;

#define threadIdx (static_cast<const uint3&>(::varcore::simt::detail::builtins.thread_idx))
#define blockIdx (static_cast<const uint3&>(::varcore::simt::detail::builtins.block_idx))
#define blockDim (static_cast<const dim3&>(::varcore::simt::detail::builtins.block_dim))
#define gridDim (static_cast<const dim3&>(::varcore::simt::detail::builtins.grid_dim))

// ---- barriers and warp operations -------------------------------------------------------------------------

inline void __syncthreads() { varcore::simt::detail::Runtime::current().sync_threads(0, nullptr); }

inline int __syncthreads_count(int predicate) {
  return static_cast<int>(varcore::simt::detail::Runtime::current().sync_threads(predicate, nullptr));
}

inline int __syncthreads_and(int predicate) {
  unsigned arrived = 0;
  const unsigned count = varcore::simt::detail::Runtime::current().sync_threads(predicate, &arrived);
  return count == arrived;
}

inline int __syncthreads_or(int predicate) {
  return varcore::simt::detail::Runtime::current().sync_threads(predicate, nullptr) != 0;
}

namespace varcore::simt::detail {

template <class T>
std::uint64_t to_lane_bits(const T& v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp shuffles move values of at most 8 bytes");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <class T>
T from_lane_bits(std::uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <class T>
T shuffle(WarpOp op, unsigned mask, T var, int arg, int width) {
  return from_lane_bits<T>(Runtime::current().warp_op(op, mask, to_lane_bits(var), arg, width, nullptr));
}

inline unsigned vote(WarpOp op, unsigned mask, int predicate, unsigned* group) {
  return static_cast<unsigned>(Runtime::current().warp_op(op, mask, predicate != 0, 0, 32, group));
}

}  // namespace varcore::simt::detail

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  varcore::simt::detail::Runtime::current().warp_op(varcore::simt::detail::WarpOp::kSync, mask, 0, 0, 32, nullptr);
}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return varcore::simt::detail::shuffle(varcore::simt::detail::WarpOp::kShflIdx, mask, var, src_lane, width);
}

template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return varcore::simt::detail::shuffle(varcore::simt::detail::WarpOp::kShflUp, mask, var, static_cast<int>(delta),
                                        width);
}

template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return varcore::simt::detail::shuffle(varcore::simt::detail::WarpOp::kShflDown, mask, var,
                                        static_cast<int>(delta), width);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return varcore::simt::detail::shuffle(varcore::simt::detail::WarpOp::kShflXor, mask, var, lane_mask, width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return varcore::simt::detail::vote(varcore::simt::detail::WarpOp::kBallot, mask, predicate, nullptr);
}

inline int __any_sync(unsigned mask, int predicate) {
  return varcore::simt::detail::vote(varcore::simt::detail::WarpOp::kAny, mask, predicate, nullptr) != 0;
}

// True when the predicate holds on every lane that took part (lanes of the mask that returned are left out).
inline int __all_sync(unsigned mask, int predicate) {
  unsigned group = 0;
  const unsigned ballot = varcore::simt::detail::vote(varcore::simt::detail::WarpOp::kAll, mask, predicate, &group);
  return ballot == group;
}

// Fences: the emulated threads of a block share one host thread; fences order memory for other host threads.
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __ldg(const T* p) {
  return *p;
}

// ---- atomics ----------------------------------------------------------------------------------------------
// Real (relaxed) host atomics: launches from several host threads may update the same memory, as concurrent
// kernels on a GPU may.

namespace varcore::simt::detail {

// Applies update to *p atomically and returns the old value (compare-and-swap loop; works for float and double).
template <class T, class F>
T atomic_update(T* p, F update) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T desired = update(old);
  while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    desired = update(old);
  }
  return old;
}

}  // namespace varcore::simt::detail

#define VARCORE_SIMT_INTEGER_ATOMICS(T)                                                                    \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                   \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }                 \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                   \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                     \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }                   \
  inline T atomicCAS(T* p, T compare, T v) {                                                             \
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);              \
    return compare;                                                                                      \
  }
VARCORE_SIMT_INTEGER_ATOMICS(int)
VARCORE_SIMT_INTEGER_ATOMICS(unsigned int)
VARCORE_SIMT_INTEGER_ATOMICS(unsigned long long)
#undef VARCORE_SIMT_INTEGER_ATOMICS

#define VARCORE_SIMT_MINMAX_ATOMICS(T)                                                                        \
  inline T atomicMin(T* p, T v) {                                                                           \
    return varcore::simt::detail::atomic_update(p, [v](T old) { return v < old ? v : old; });               \
  }                                                                                                         \
  inline T atomicMax(T* p, T v) {                                                                           \
    return varcore::simt::detail::atomic_update(p, [v](T old) { return v > old ? v : old; });               \
  }
VARCORE_SIMT_MINMAX_ATOMICS(int)
VARCORE_SIMT_MINMAX_ATOMICS(unsigned int)
VARCORE_SIMT_MINMAX_ATOMICS(long long)
VARCORE_SIMT_MINMAX_ATOMICS(unsigned long long)
#undef VARCORE_SIMT_MINMAX_ATOMICS

inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline unsigned int atomicSub(unsigned int* p, unsigned int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }

inline float atomicAdd(float* p, float v) {
  return varcore::simt::detail::atomic_update(p, [v](float old) { return old + v; });
}
inline double atomicAdd(double* p, double v) {
  return varcore::simt::detail::atomic_update(p, [v](double old) { return old + v; });
}
inline float atomicExch(float* p, float v) {
  float old;
  __atomic_exchange(p, &v, &old, __ATOMIC_RELAXED);
  return old;
}

// Wrapping counters: atomicInc counts 0..limit, atomicDec counts limit..0, both starting over.
inline unsigned int atomicInc(unsigned int* p, unsigned int limit) {
  return varcore::simt::detail::atomic_update(p, [limit](unsigned old) { return old >= limit ? 0u : old + 1; });
}
inline unsigned int atomicDec(unsigned int* p, unsigned int limit) {
  return varcore::simt::detail::atomic_update(
      p, [limit](unsigned old) { return (old == 0 || old > limit) ? limit : old - 1; });
}

// ---- math ---------------------------------------------------------------------------------------------------
// glibc declares __expf, __logf, ... as internal names it does not export, so the fast intrinsics are macros
// for the precise functions (the emulation is at least as accurate as the GPU).
#define __expf(x) (::expf(x))
#define __exp10f(x) (::exp10f(x))
#define __logf(x) (::logf(x))
#define __log2f(x) (::log2f(x))
#define __log10f(x) (::log10f(x))
#define __sinf(x) (::sinf(x))
#define __cosf(x) (::cosf(x))
#define __tanf(x) (::tanf(x))
#define __powf(x, y) (::powf((x), (y)))
#define __sincosf(x, s, c) (::sincosf((x), (s), (c)))

inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return ::sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return ::fmaf(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / ::sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN gives 0

namespace varcore::simt::detail {

// Float to integer conversion with the GPU's saturation (NaN gives 0), after rounding r.
template <class I, class R>
I saturating_cast(float x, R r) {
  if (std::isnan(x)) return 0;
  const double v = r(static_cast<double>(x));
  if (v <= static_cast<double>(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
  if (v >= static_cast<double>(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
  return static_cast<I>(v);
}

inline double round_even(double v) { return std::nearbyint(v); }  // the default rounding mode: to nearest even
inline double round_zero(double v) { return std::trunc(v); }
inline double round_down(double v) { return std::floor(v); }
inline double round_up(double v) { return std::ceil(v); }

template <class To, class From>
To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

}  // namespace varcore::simt::detail

inline int __float2int_rn(float x) {
  return varcore::simt::detail::saturating_cast<int>(x, varcore::simt::detail::round_even);
}
inline int __float2int_rz(float x) {
  return varcore::simt::detail::saturating_cast<int>(x, varcore::simt::detail::round_zero);
}
inline int __float2int_rd(float x) {
  return varcore::simt::detail::saturating_cast<int>(x, varcore::simt::detail::round_down);
}
inline int __float2int_ru(float x) {
  return varcore::simt::detail::saturating_cast<int>(x, varcore::simt::detail::round_up);
}
inline unsigned int __float2uint_rn(float x) {
  return varcore::simt::detail::saturating_cast<unsigned int>(x, varcore::simt::detail::round_even);
}
inline unsigned int __float2uint_rz(float x) {
  return varcore::simt::detail::saturating_cast<unsigned int>(x, varcore::simt::detail::round_zero);
}
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned int x) { return static_cast<float>(x); }

inline float __int_as_float(int x) { return varcore::simt::detail::bit_cast<float>(x); }
inline int __float_as_int(float x) { return varcore::simt::detail::bit_cast<int>(x); }
inline float __uint_as_float(unsigned int x) { return varcore::simt::detail::bit_cast<float>(x); }
inline unsigned int __float_as_uint(float x) { return varcore::simt::detail::bit_cast<unsigned int>(x); }
inline double __longlong_as_double(long long x) { return varcore::simt::detail::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return varcore::simt::detail::bit_cast<long long>(x); }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  unsigned int r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// CUDA's device min and max accept any two arithmetic types, with the usual arithmetic conversions.
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) {
    return std::fmin(static_cast<C>(a), static_cast<C>(b));
  } else {
    return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
  }
}

template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) {
    return std::fmax(static_cast<C>(a), static_cast<C>(b));
  } else {
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
  }
}

// ---- vector types -------------------------------------------------------------------------------------------

#define VARCORE_SIMT_VECTOR_TYPES(T, name, align2, align4)                                                   \
  struct alignas(align2) name##2 { T x, y; };                                                               \
  struct name##3 { T x, y, z; };                                                                            \
  struct alignas(align4) name##4 { T x, y, z, w; };                                                         \
  inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }                                         \
  inline name##3 make_##name##3(T x, T y, T z) { return name##3{x, y, z}; }                                 \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }
VARCORE_SIMT_VECTOR_TYPES(float, float, 8, 16)
VARCORE_SIMT_VECTOR_TYPES(int, int, 8, 16)
VARCORE_SIMT_VECTOR_TYPES(double, double, 16, 16)
#undef VARCORE_SIMT_VECTOR_TYPES

struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

static_assert(sizeof(float4) == 16 && alignof(float4) == 16 && alignof(float2) == 8 && sizeof(float3) == 12,
              "vector types must match CUDA's layout");
static_assert(sizeof(double2) == 16 && alignof(double2) == 16 && alignof(int4) == 16 && alignof(uint2) == 8,
              "vector types must match CUDA's layout");
