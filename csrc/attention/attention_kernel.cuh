// CUDA kernels of block-causal attention (plain CUDA; also compiled against csrc/simt for the tests).
//
// Forward (FlashAttention-2): one block of 4 warps per (query tile, head, batch). The block walks the key tiles
// up to its rows' largest visible_end (the rest are skipped, never loaded); per tile it computes the scores
// S = Q K^T with 16x16x16 products (common/mma.h), runs the online softmax (one warp per row: running max m and
// sum l, output rows rescaled when m grows), and adds P V to a float32 output tile in shared memory.
// Backward: one block per (key tile, head, batch) accumulates dK and dV in shared memory over the query tiles
// that see the key tile, recomputing P = exp(S - lse), and adds its part of dQ to a float32 buffer with atomics.
//
// Tiles (bq query rows, bk keys, dp = head dim padded to 16) are chosen by the launcher to fit the shared
// memory limit; every tile lives in dynamic shared memory, zero-padded, at 128-byte aligned offsets.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>

#include "attention/attention.h"
#include "common/cuda_compat.h"
#include "common/mma.h"

namespace varcore::attention {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Tiles {
  int bq, bk, dp;
};

VC_HOST_DEVICE inline std::size_t carve(std::size_t& offset, std::size_t bytes) {
  const std::size_t at = offset;
  offset = (offset + bytes + 127) / 128 * 128;
  return at;
}

// Byte offsets of the forward kernel's shared memory buffers.
struct ForwardSmem {
  std::size_t q, k, v, s, p, o, m, l, ends, total = 0;
  VC_HOST_DEVICE ForwardSmem(Tiles t, std::size_t elem) {
    q = carve(total, t.bq * t.dp * elem);
    k = carve(total, t.bk * t.dp * elem);
    v = carve(total, t.bk * t.dp * elem);
    s = carve(total, t.bq * t.bk * sizeof(float));
    p = carve(total, t.bq * t.bk * elem);
    o = carve(total, t.bq * t.dp * sizeof(float));
    m = carve(total, t.bq * sizeof(float));
    l = carve(total, t.bq * sizeof(float));
    ends = carve(total, t.bq * sizeof(int));
  }
};

// Byte offsets of the backward kernel's shared memory buffers.
struct BackwardSmem {
  std::size_t k, v, dk, dv, q, dout, s, dp, p, ds, dq, lse2, delta, ends, total = 0;
  VC_HOST_DEVICE BackwardSmem(Tiles t, std::size_t elem) {
    k = carve(total, t.bk * t.dp * elem);
    v = carve(total, t.bk * t.dp * elem);
    dk = carve(total, t.bk * t.dp * sizeof(float));
    dv = carve(total, t.bk * t.dp * sizeof(float));
    q = carve(total, t.bq * t.dp * elem);
    dout = carve(total, t.bq * t.dp * elem);
    s = carve(total, t.bq * t.bk * sizeof(float));
    dp = carve(total, t.bq * t.bk * sizeof(float));
    p = carve(total, t.bq * t.bk * elem);
    ds = carve(total, t.bq * t.bk * elem);
    dq = carve(total, t.bq * t.dp * sizeof(float));
    lse2 = carve(total, t.bq * sizeof(float));
    delta = carve(total, t.bq * sizeof(float));
    ends = carve(total, t.bq * sizeof(int));
  }
};

template <class P>
VC_DEVICE_INLINE P* smem_at(unsigned char* base, std::size_t offset) {
  return reinterpret_cast<P*>(base + offset);
}

template <class T>
VC_DEVICE_INLINE const T* head_of(const View& v, int64_t b, int64_t h) {
  return static_cast<const T*>(v.data) + b * v.sb + h * v.sh;
}

// dst[r][d] (row stride dp) = src row r (row stride sl) for r < rows and d < D; zero elsewhere up to total rows.
template <class T>
VC_DEVICE_INLINE void load_rows(T* dst, const T* src, int64_t sl, int rows, int total, int D, int dp) {
  for (int e = threadIdx.x; e < total * dp; e += blockDim.x) {
    const int r = e / dp, d = e % dp;
    dst[e] = (r < rows && d < D) ? src[r * sl + d] : mma::from_float<T>(0.0f);
  }
}

VC_DEVICE_INLINE void fill_zero(float* dst, int n) {
  for (int e = threadIdx.x; e < n; e += blockDim.x) dst[e] = 0.0f;
}

VC_DEVICE_INLINE float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

VC_DEVICE_INLINE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// C (rows x cols, row stride ldc, float) = or += A (rows x kdim) * B (kdim x cols), all multiples of 16; the
// 16x16 output fragments are dealt out to the warps. A and B are given as fragment loaders.
template <class T, class LA, class LB, class AddrA, class AddrB>
VC_DEVICE_INLINE void block_gemm(float* c, int ldc, int rows, int cols, int kdim, bool accumulate, AddrA a_at,
                                 AddrB b_at, int lda, int ldb) {
  const int warp = threadIdx.x / 32;
  const int tiles_n = cols / 16;
  for (int f = warp; f < (rows / 16) * tiles_n; f += kWarps) {
    const int i = f / tiles_n, j = f % tiles_n;
    mma::Acc<T> acc;
    if (accumulate) {
      mma::load_acc(acc, c + i * 16 * ldc + j * 16, ldc);
    } else {
      mma::fill(acc, 0.0f);
    }
    for (int kk = 0; kk < kdim / 16; ++kk) {
      mma::FragA<T, LA> a;
      mma::FragB<T, LB> b;
      mma::load(a, a_at(i, kk), lda);
      mma::load(b, b_at(kk, j), ldb);
      mma::mma(acc, a, b);
    }
    mma::store_acc(c + i * 16 * ldc + j * 16, ldc, acc);
  }
}

// Address of 16x16 block (i, j) of a row-major matrix with leading dimension ld, or of the transpose of one
// (a col-major view: block (i, j) of X^T is block (j, i) of X).
template <class T>
struct RowBlocks {
  const T* base;
  int ld;
  VC_DEVICE_INLINE const T* operator()(int i, int j) const { return base + i * 16 * ld + j * 16; }
};
template <class T>
struct TransposedBlocks {
  const T* base;
  int ld;
  VC_DEVICE_INLINE const T* operator()(int i, int j) const { return base + j * 16 * ld + i * 16; }
};

// ---------------------------------------------------------------------------------------------- forward
// One online-softmax step for row r of the tile: scores s (float, already in base 2 after `mul`), of which the
// first `visible` count; writes probabilities to p and rescales the row of o. Called by a whole warp.
template <class T>
VC_DEVICE_INLINE void online_softmax_row(const float* s, T* p, float* o, float* m, float* l, int visible, int bk,
                                         int dp, float mul) {
  const int lane = threadIdx.x % 32;
  if (visible <= 0) {
    for (int c = lane; c < bk; c += 32) p[c] = mma::from_float<T>(0.0f);
    return;
  }
  float mx = -INFINITY;
  for (int c = lane; c < visible && c < bk; c += 32) mx = fmaxf(mx, s[c] * mul);
  const float m_old = *m;
  const float m_new = fmaxf(m_old, warp_max(mx));
  const float alpha = exp2f(m_old - m_new);  // 0 on the row's first visible tile
  float sum = 0.0f;
  for (int c = lane; c < bk; c += 32) {
    const float e = c < visible ? exp2f(s[c] * mul - m_new) : 0.0f;
    p[c] = mma::from_float<T>(e);
    sum += e;
  }
  sum = warp_sum(sum);
  for (int d = lane; d < dp; d += 32) o[d] *= alpha;
  if (lane == 0) {
    *m = m_new;
    *l = *l * alpha + sum;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardParams p, Tiles t) {
  VC_DYNAMIC_SHARED(unsigned char, smem);
  const ForwardSmem at(t, sizeof(T));
  T* qs = smem_at<T>(smem, at.q);
  T* ks = smem_at<T>(smem, at.k);
  T* vs = smem_at<T>(smem, at.v);
  float* ss = smem_at<float>(smem, at.s);
  T* ps = smem_at<T>(smem, at.p);
  float* os = smem_at<float>(smem, at.o);
  float* ms = smem_at<float>(smem, at.m);
  float* ls = smem_at<float>(smem, at.l);
  int* ends = smem_at<int>(smem, at.ends);

  const int64_t b = blockIdx.z, h = blockIdx.y, q0 = int64_t(blockIdx.x) * t.bq;
  const int rows = static_cast<int>(min(int64_t(t.bq), p.Lq - q0));
  const int D = static_cast<int>(p.D), dp = t.dp;
  for (int r = threadIdx.x; r < t.bq; r += blockDim.x) {
    ends[r] = r < rows ? p.visible_end[q0 + r] : 0;
    VC_DEVICE_CHECK(ends[r] >= 0 && ends[r] <= p.Lk,  // the glue does not read it on a GPU
                    "block_causal_attention: visible_end values must be in [0, Lk]");
    ms[r] = -INFINITY;
    ls[r] = 0.0f;
  }
  fill_zero(os, t.bq * dp);
  load_rows(qs, head_of<T>(p.q, b, h) + q0 * p.q.sl, p.q.sl, rows, t.bq, D, dp);
  __syncthreads();
  int tile_end = 0;
  for (int r = 0; r < rows; ++r) tile_end = max(tile_end, ends[r]);

  const float mul = static_cast<float>(p.scale) * kLog2e;
  const T* k = head_of<T>(p.k, b, h);
  const T* v = head_of<T>(p.v, b, h);
  for (int k0 = 0; k0 < tile_end; k0 += t.bk) {
    const int kn = static_cast<int>(min(int64_t(t.bk), p.Lk - k0));
    load_rows(ks, k + k0 * p.k.sl, p.k.sl, kn, t.bk, D, dp);
    load_rows(vs, v + k0 * p.v.sl, p.v.sl, kn, t.bk, D, dp);
    __syncthreads();
    // S = Q K^T
    block_gemm<T, mma::row_major, mma::col_major>(ss, t.bk, t.bq, t.bk, dp, false, RowBlocks<T>{qs, dp},
                                                  TransposedBlocks<T>{ks, dp}, dp, dp);
    __syncthreads();
    for (int r = threadIdx.x / 32; r < t.bq; r += kWarps) {
      online_softmax_row(ss + r * t.bk, ps + r * t.bk, os + r * dp, ms + r, ls + r, ends[r] - k0, t.bk, dp, mul);
    }
    __syncthreads();
    // O += P V
    block_gemm<T, mma::row_major, mma::row_major>(os, dp, t.bq, dp, t.bk, true, RowBlocks<T>{ps, t.bk},
                                                  RowBlocks<T>{vs, dp}, t.bk, dp);
    __syncthreads();
  }

  T* out = static_cast<T*>(p.out.data) + b * p.out.sb + h * p.out.sh + q0 * p.out.sl;
  for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    const float l = ls[r];
    out[r * p.out.sl + d] = mma::from_float<T>(l > 0.0f ? os[r * dp + d] / l : 0.0f);
  }
  float* lse = static_cast<float*>(p.lse) + (b * p.H + h) * p.Lq + q0;
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    lse[r] = ls[r] > 0.0f ? (ms[r] + log2f(ls[r])) * kLn2 : -INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------- backward
template <class T>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardParams p, Tiles t) {
  VC_DYNAMIC_SHARED(unsigned char, smem);
  const BackwardSmem at(t, sizeof(T));
  T* ks = smem_at<T>(smem, at.k);
  T* vs = smem_at<T>(smem, at.v);
  float* dks = smem_at<float>(smem, at.dk);
  float* dvs = smem_at<float>(smem, at.dv);
  T* qs = smem_at<T>(smem, at.q);
  T* dos = smem_at<T>(smem, at.dout);
  float* ss = smem_at<float>(smem, at.s);
  float* dps = smem_at<float>(smem, at.dp);
  T* ps = smem_at<T>(smem, at.p);
  T* dss = smem_at<T>(smem, at.ds);
  float* dqs = smem_at<float>(smem, at.dq);
  float* lse2 = smem_at<float>(smem, at.lse2);
  float* delta = smem_at<float>(smem, at.delta);
  int* ends = smem_at<int>(smem, at.ends);

  const int64_t b = blockIdx.z, h = blockIdx.y, k0 = int64_t(blockIdx.x) * t.bk;
  const int kn = static_cast<int>(min(int64_t(t.bk), p.Lk - k0));
  const int D = static_cast<int>(p.D), dp = t.dp;
  const float scale = static_cast<float>(p.scale), mul = scale * kLog2e;
  load_rows(ks, head_of<T>(p.k, b, h) + k0 * p.k.sl, p.k.sl, kn, t.bk, D, dp);
  load_rows(vs, head_of<T>(p.v, b, h) + k0 * p.v.sl, p.v.sl, kn, t.bk, D, dp);
  fill_zero(dks, t.bk * dp);
  fill_zero(dvs, t.bk * dp);
  const float* lse = static_cast<const float*>(p.lse) + (b * p.H + h) * p.Lq;
  const float* dlt = static_cast<const float*>(p.delta) + (b * p.H + h) * p.Lq;
  float* dq = p.dq_accum + (b * p.H + h) * p.Lq * p.D;

  for (int64_t q0 = 0; q0 < p.Lq; q0 += t.bq) {
    const int rows = static_cast<int>(min(int64_t(t.bq), p.Lq - q0));
    int sees = 0;
    for (int r = threadIdx.x; r < t.bq; r += blockDim.x) {
      ends[r] = r < rows ? p.visible_end[q0 + r] : 0;
      VC_DEVICE_CHECK(ends[r] >= 0 && ends[r] <= p.Lk,
                      "block_causal_attention: visible_end values must be in [0, Lk]");
      lse2[r] = r < rows ? lse[q0 + r] * kLog2e : 0.0f;
      delta[r] = r < rows ? dlt[q0 + r] : 0.0f;
      sees |= ends[r] > k0;
    }
    if (!__syncthreads_or(sees)) continue;  // no row of this query tile sees the key tile
    load_rows(qs, head_of<T>(p.q, b, h) + q0 * p.q.sl, p.q.sl, rows, t.bq, D, dp);
    load_rows(dos, head_of<T>(p.dout, b, h) + q0 * p.dout.sl, p.dout.sl, rows, t.bq, D, dp);
    __syncthreads();
    // S = Q K^T and dP = dO V^T
    block_gemm<T, mma::row_major, mma::col_major>(ss, t.bk, t.bq, t.bk, dp, false, RowBlocks<T>{qs, dp},
                                                  TransposedBlocks<T>{ks, dp}, dp, dp);
    block_gemm<T, mma::row_major, mma::col_major>(dps, t.bk, t.bq, t.bk, dp, false, RowBlocks<T>{dos, dp},
                                                  TransposedBlocks<T>{vs, dp}, dp, dp);
    __syncthreads();
    // P = exp(S - lse) where visible, dS = P (dP - delta)
    for (int e = threadIdx.x; e < t.bq * t.bk; e += blockDim.x) {
      const int r = e / t.bk, c = e % t.bk;
      const float pr = k0 + c < ends[r] ? exp2f(ss[e] * mul - lse2[r]) : 0.0f;
      ps[e] = mma::from_float<T>(pr);
      dss[e] = mma::from_float<T>(pr * (dps[e] - delta[r]));
    }
    __syncthreads();
    // dV += P^T dO, dK += dS^T Q, dQ = dS K
    block_gemm<T, mma::col_major, mma::row_major>(dvs, dp, t.bk, dp, t.bq, true, TransposedBlocks<T>{ps, t.bk},
                                                  RowBlocks<T>{dos, dp}, t.bk, dp);
    block_gemm<T, mma::col_major, mma::row_major>(dks, dp, t.bk, dp, t.bq, true, TransposedBlocks<T>{dss, t.bk},
                                                  RowBlocks<T>{qs, dp}, t.bk, dp);
    block_gemm<T, mma::row_major, mma::row_major>(dqs, dp, t.bq, dp, t.bk, false, RowBlocks<T>{dss, t.bk},
                                                  RowBlocks<T>{ks, dp}, t.bk, dp);
    __syncthreads();
    for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
      const int r = e / D, d = e % D;
      atomicAdd(dq + (q0 + r) * p.D + d, dqs[r * dp + d] * scale);
    }
    __syncthreads();
  }

  T* dk = static_cast<T*>(p.dk.data) + b * p.dk.sb + h * p.dk.sh + k0 * p.dk.sl;
  T* dv = static_cast<T*>(p.dv.data) + b * p.dv.sb + h * p.dv.sh + k0 * p.dv.sl;
  for (int e = threadIdx.x; e < kn * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    dk[r * p.dk.sl + d] = mma::from_float<T>(dks[r * dp + d] * scale);
    dv[r * p.dv.sl + d] = mma::from_float<T>(dvs[r * dp + d]);
  }
}

}  // namespace varcore::attention
