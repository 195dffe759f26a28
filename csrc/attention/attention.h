// Block-causal attention (VAR scales, CoDe prefixes, PAR groups). Plain structs and declarations: no ATen here.
//
// The mask is a prefix per query: query i attends to keys [0, visible_end[i]). Every tensor is seen as a
// (B, H, L, D) view with element strides for B, H and L and a contiguous head dimension, so the (B, L, H, D)
// layout is the same view with other strides. Outputs: out (like q) and the softmax log-sum-exp per query,
// lse (B, H, Lq) float32 (float64 for float64 inputs), natural log; a query that sees no key gets out = 0 and
// lse = -inf.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/backend.h"

namespace varcore::attention {

enum class DType : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

// A (B, H, L, D) view: element strides of B, H, L; D has stride 1.
struct View {
  void* data;
  int64_t sb, sh, sl;
};

struct ForwardParams {
  View q, k, v, out;
  void* lse;                    // (B, H, Lq), contiguous; float32 (float64 for float64 inputs)
  const int32_t* visible_end;   // (Lq,), values in [0, Lk]
  int64_t B, H, Lq, Lk, D;
  double scale;
  DType dtype;
  std::size_t smem_limit;       // CUDA: dynamic shared memory a block may use (bytes)
};

// The forward's fields describe the forward call being differentiated (lse is read, not written).
struct BackwardParams : ForwardParams {
  View dout, dq, dk, dv;
  const void* delta;            // (B, H, Lq), same dtype as lse: rowsum(dout * out) - grad_lse
  float* dq_accum;              // CUDA: (B, H, Lq, D) float32, zeroed; dq is accumulated here across key tiles
};

constexpr int64_t kMaxHeadDim = 256;

// The kernels on one backend (common/backend.h): attention_cpu.cpp defines Cpu's (no stream), attention_cuda.cu
// Cuda's (nvcc; stream is a cudaStream_t) and Simt's (the host emulation), which take float32, float16 and
// bfloat16 only.
template <class Backend>
void run_forward(const ForwardParams& p, void* stream);
template <class Backend>
void run_backward(const BackwardParams& p, void* stream);
template <>
void run_forward<Cpu>(const ForwardParams& p, void* stream);
template <>
void run_forward<Cuda>(const ForwardParams& p, void* stream);
template <>
void run_forward<Simt>(const ForwardParams& p, void* stream);
template <>
void run_backward<Cpu>(const BackwardParams& p, void* stream);
template <>
void run_backward<Cuda>(const BackwardParams& p, void* stream);
template <>
void run_backward<Simt>(const BackwardParams& p, void* stream);

}  // namespace varcore::attention
