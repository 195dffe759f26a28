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

struct BackwardParams {
  View q, k, v, dout, dq, dk, dv;
  const void* lse;              // (B, H, Lq) from the forward; float32 (float64 for float64 inputs)
  const void* delta;            // (B, H, Lq), same dtype as lse: rowsum(dout * out) - grad_lse
  const int32_t* visible_end;
  float* dq_accum;              // CUDA: (B, H, Lq, D) float32, zeroed; dq is accumulated here across key tiles
  int64_t B, H, Lq, Lk, D;
  double scale;
  DType dtype;
  std::size_t smem_limit;
};

constexpr int64_t kMaxHeadDim = 256;

void forward_cpu(const ForwardParams& p);
void backward_cpu(const BackwardParams& p);

// attention_cuda.cu, built by nvcc (stream is a cudaStream_t) and, as *_simt, against the host emulation.
// float32, float16 and bfloat16 only.
void forward_cuda(const ForwardParams& p, void* stream);
void backward_cuda(const BackwardParams& p, void* stream);
void forward_simt(const ForwardParams& p, void* stream);
void backward_simt(const BackwardParams& p, void* stream);

}  // namespace varcore::attention
