// CUDA kernels of the quantiser (plain CUDA; also compiled against csrc/simt).
#pragma once

#include "common/cuda_compat.h"
#include "quant/quant.h"

namespace varcore::quant {

// Nearest code. A block owns kRows rows and walks the codebook in tiles of `tile` codes staged in shared memory
// (rows padded to C + 1 floats against bank conflicts). Thread (r, l) computes the distances of row r to the codes
// l, l + kLanes, ... of each tile with one FMA chain over c, keeping a running minimum whose codes only increase,
// so a strict comparison keeps the first minimum; the kLanes lanes of a row (adjacent threads of one warp) are
// merged with shuffles, ties going to the smaller index.
constexpr int kRows = 32;
constexpr int kLanes = 8;
constexpr int kNearestThreads = kRows * kLanes;

VC_DEVICE_INLINE bool better(float d, int v, float best, int best_v) {
  return d < best || (d == best && v < best_v);
}

__global__ void nearest_code_kernel(NearestParams p, int tile) {
  VC_DYNAMIC_SHARED(float, smem);
  const int64_t stride = p.C + 1;
  float* z_s = smem;                      // kRows x stride
  float* e_s = smem + kRows * stride;     // tile x stride
  const int r = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int64_t row = row0 + r;

  for (int64_t i = threadIdx.x; i < kRows * p.C; i += blockDim.x) {
    const int64_t rr = row0 + i / p.C;
    z_s[(i / p.C) * stride + i % p.C] = rr < p.N ? p.z[rr * p.C + i % p.C] : 0.0f;
  }
  const float zn = row < p.N ? p.z_norm[row] : 0.0f;
  float best = __int_as_float(0x7f800000);  // +inf
  int best_v = 0;
  for (int64_t v0 = 0; v0 < p.V; v0 += tile) {
    __syncthreads();  // the previous tile is no longer read
    for (int64_t i = threadIdx.x; i < tile * p.C; i += blockDim.x) {
      const int64_t v = v0 + i / p.C;
      e_s[(i / p.C) * stride + i % p.C] = v < p.V ? p.codes[v * p.C + i % p.C] : 0.0f;
    }
    __syncthreads();
    for (int k = lane; k < tile && v0 + k < p.V; k += kLanes) {
      float dot = 0.0f;
      for (int64_t c = 0; c < p.C; ++c) dot = fmaf(z_s[r * stride + c], e_s[k * stride + c], dot);
      const float d = code_distance(zn, p.code_norm[v0 + k], dot);
      if (d < best) {
        best = d;
        best_v = int(v0 + k);
      }
    }
  }
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset, kLanes);
    const int other_v = __shfl_xor_sync(0xffffffffu, best_v, offset, kLanes);
    if (better(other, other_v, best, best_v)) {
      best = other;
      best_v = other_v;
    }
  }
  if (lane == 0 && row < p.N) p.idx[row] = best_v;
}

// Upsample-sum: one thread per output element (b, group, c, y, x), grid-stride, summing its group's scales in
// order; bicubic along x for each of the four source rows, then along y (ATen's order). Consecutive threads take
// consecutive elements of the output's memory, so the writes are coalesced.
__global__ void upsample_sum_kernel(UpsampleSumParams p) {
  const int64_t HH = p.H * p.H;
  const int64_t total = p.B * p.K * p.C * HH;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    // memory order: (b, g, c, y, x), or (b, y, x, g, c) when channels_last
    const int64_t KC = p.K * p.C, t = p.channels_last ? (i / KC) % HH : i % HH;
    const int64_t gc = p.channels_last ? i % KC : (i / HH) % KC;
    const int64_t c = gc % p.C, g = gc / p.C, b = i / (HH * KC);
    const int y = int(t / p.H), x = int(t % p.H);
    float sum = 0.0f;
    // the glue does not read idx on a GPU: each token is checked where it is read
    auto code = [&](int64_t token) {
      VC_DEVICE_CHECK(token >= 0 && token < p.V, "idx values must be in [0, V), V = the codebook's rows");
      return p.table[token * p.C + c];
    };
    for (int si = 0; si < p.scales; ++si) {
      if (p.group[si] != g) continue;
      const int pn = p.pn[si];
      const int64_t* tokens = p.idx + b * p.L + p.offset[si];
      if (pn == p.H) {  // same size: bicubic is the identity
        sum += code(tokens[y * p.H + x]);
        continue;
      }
      int ix[4], iy[4];
      float wx[4], wy[4], rows[4], taps[4];
      bicubic_taps(x, pn, int(p.H), ix, wx);
      bicubic_taps(y, pn, int(p.H), iy, wy);
      for (int k = 0; k < 4; ++k) {
        for (int j = 0; j < 4; ++j) taps[j] = code(tokens[iy[k] * pn + ix[j]]);
        rows[k] = cubic_sum(taps, wx);
      }
      sum += cubic_sum(rows, wy);
    }
    p.out[i] = sum;
  }
}

// Area downsampling: one thread per output (row, channel), channel fastest (coalesced writes for token rows).
__global__ void area_kernel(AreaParams p) {
  const int64_t total = p.B * p.ph * p.pw * p.C;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t c = i % p.C, n = i / p.C;
    const int64_t ox = n % p.pw, oy = (n / p.pw) % p.ph, b = n / (p.pw * p.ph);
    p.out[b * p.sb + c * p.sc + oy * p.sy + ox * p.sx] =
        area_average(p.src + (b * p.C + c) * p.H * p.W, p.W, area_begin(oy, p.ph, p.H), area_end(oy, p.ph, p.H),
                     area_begin(ox, p.pw, p.W), area_end(ox, p.pw, p.W));
  }
}

}  // namespace varcore::quant
