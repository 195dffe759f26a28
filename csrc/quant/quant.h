// VAR's multi-scale residual quantiser (spec: var.md 1.3-1.7). Plain structs and declarations: no ATen here.
//
// nearest_code: for each row z_n of an (N, C) matrix, the index of the nearest of V codes e_v, evaluated as the
// official code does, d(n, v) = (|z_n|^2 + |e_v|^2) + (-2 * <z_n, e_v>), without ever holding the N x V distance
// matrix. The norms come in precomputed (the ATen glue takes them with the same torch.sum the reference uses), the
// dot product is one fused multiply-add chain over c = 0..C-1, and ties keep the first (smallest) index, as
// torch.argmin does. The cosine variant passes zero norms and normalised rows: d = -2 <z, e> orders the codes
// exactly as -<z, e>, so the first maximum of the cosine wins, as torch.argmax does. A NaN distance never wins
// (torch.argmin would return the first NaN); a row whose distances are all NaN or +inf gets index 0.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/backend.h"
#include "common/host_device.h"

namespace varcore::quant {

struct NearestParams {
  const float* z;          // (N, C), rows contiguous
  const float* codes;      // (V, C), rows contiguous
  const float* z_norm;     // (N,)
  const float* code_norm;  // (V,)
  int64_t* idx;            // (N,) output
  int64_t N, V, C;
};

// Distance of one (row, code) pair from its dot product, in the official evaluation order.
VC_HD float code_distance(float z_norm, float code_norm, float dot) { return (z_norm + code_norm) + (-2.0f * dot); }

// The CUDA kernel stages 32 rows and at least 8 codes of C + 1 floats in 48 KiB of shared memory.
constexpr int64_t kNearestSmemFloats = 48 * 1024 / 4;
constexpr int64_t kNearestCudaMaxC = kNearestSmemFloats / 40 - 1;

// upsample_sum: the per-scale token maps of a pyramid, gathered from a table of C-channel rows, bicubic-upsampled
// to H x H (F.interpolate(mode="bicubic", align_corners=False); a scale of side H is copied) and summed per phi
// group: out[b, g*C + c] = sum over scales si with group[si] == g of up(table[idx[b, offset[si] + i]][c]).
// Scale si occupies tokens [offset[si], offset[si] + pn[si]^2) of each row of idx, row-major.
constexpr int kMaxScales = 32;

struct UpsampleSumParams {
  const int64_t* idx;  // (B, L)
  const float* table;  // (V, C), rows contiguous
  float* out;          // (B, K*C, H, H), every element written; memory (B, H, H, K*C) when channels_last
  int64_t B, L, V, C, H, K;
  bool channels_last;
  int scales;
  int pn[kMaxScales];
  int group[kMaxScales];
  int64_t offset[kMaxScales];
};

// a * b rounded on its own, so that no compiler fuses it into the add that follows (a volatile on the host, where
// the CPU kernels are built with contraction on).
VC_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float p = a * b;
  return p;
#endif
}

// Bicubic taps of output position `dst` when resizing `in` samples to `out` (align_corners=False, A=-0.75):
// the clamped source indices and weights. The arithmetic is ATen's CPU kernel (upsample_bicubic2d, float opmath)
// with the fused multiply-adds its compiler forms spelled out (found by probing F.interpolate with one-hot inputs),
// so that every build rounds alike and matches it bit for bit.
VC_HD void bicubic_taps(int dst, int in, int out, int index[4], float weight[4]) {
  const float A = -0.75f;
  const float scale = float(in) / float(out);
  const float real = fmaf(scale, float(dst) + 0.5f, -0.5f);
  const float start = floorf(real);
  const float t = fminf(fmaxf(real - start, 0.0f), 1.0f);
  // cubic_convolution1(x) = ((A + 2) x - (A + 3)) x x + 1, cubic_convolution2(x) = ((A x - 5A) x + 8A) x - 4A
  const auto near = [A](float x) { return mul_rn(fmaf(A + 2.0f, x, -(A + 3.0f)) * x, x) + 1.0f; };
  const auto far = [A](float x) { return mul_rn(fmaf(fmaf(A, x, -5.0f * A), x, 8.0f * A), x) - 4.0f * A; };
  weight[0] = far(t + 1.0f);
  weight[1] = near(t);
  weight[2] = near(1.0f - t);
  weight[3] = far((1.0f - t) + 1.0f);
  for (int k = 0; k < 4; ++k) {
    const int i = int(start) - 1 + k;
    index[k] = i < 0 ? 0 : (i > in - 1 ? in - 1 : i);
  }
}

// ATen's interpolation sum of four taps as its compiler contracts `v0 w0; += v1 w1; += v2 w2; += v3 w3`: the
// second product rounded, the others fused (this order reproduces F.interpolate bit for bit).
VC_HD float cubic_sum(const float v[4], const float w[4]) {
  return fmaf(v[3], w[3], fmaf(v[2], w[2], fmaf(v[0], w[0], v[1] * w[1])));
}

// Area downsampling (F.interpolate(mode="area"), i.e. adaptive average pooling) of a contiguous (B, C, H, W) map
// to ph x pw. Output (b, c, y, x) goes to out[b*sb + c*sc + y*sy + x*sx]: token rows (B*ph*pw, C) for the
// nearest-code search, or a contiguous (B, C, ph, pw) map.
struct AreaParams {
  const float* src;  // (B, C, H, W)
  float* out;
  int64_t B, C, H, W, ph, pw;
  int64_t sb, sc, sy, sx;
};

// The window of output cell `o` of `out` over `in` samples: [area_begin, area_end), as ATen's adaptive pooling.
VC_HD int64_t area_begin(int64_t o, int64_t out, int64_t in) { return (o * in) / out; }
VC_HD int64_t area_end(int64_t o, int64_t out, int64_t in) { return ((o + 1) * in + out - 1) / out; }

// One output of the area downsampling: the window's sum in row-major order, then / kh / kw (ATen's arithmetic).
VC_HD float area_average(const float* plane, int64_t W, int64_t y0, int64_t y1, int64_t x0, int64_t x1) {
  float sum = 0.0f;
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = x0; x < x1; ++x) sum += plane[y * W + x];
  }
  return sum / float(y1 - y0) / float(x1 - x0);
}

// The kernels on one backend (common/backend.h): quant_cpu.cpp defines Cpu's (no stream), quant_cuda.cu Cuda's
// (nvcc; stream is a cudaStream_t) and Simt's (the host emulation).
template <class Backend>
void run_nearest_code(const NearestParams& p, void* stream);
template <class Backend>
void run_upsample_sum(const UpsampleSumParams& p, void* stream);
template <class Backend>
void run_area(const AreaParams& p, void* stream);
template <>
void run_nearest_code<Cpu>(const NearestParams& p, void* stream);
template <>
void run_nearest_code<Cuda>(const NearestParams& p, void* stream);
template <>
void run_nearest_code<Simt>(const NearestParams& p, void* stream);
template <>
void run_upsample_sum<Cpu>(const UpsampleSumParams& p, void* stream);
template <>
void run_upsample_sum<Cuda>(const UpsampleSumParams& p, void* stream);
template <>
void run_upsample_sum<Simt>(const UpsampleSumParams& p, void* stream);
template <>
void run_area<Cpu>(const AreaParams& p, void* stream);
template <>
void run_area<Cuda>(const AreaParams& p, void* stream);
template <>
void run_area<Simt>(const AreaParams& p, void* stream);

}  // namespace varcore::quant
