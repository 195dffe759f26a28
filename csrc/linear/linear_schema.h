// The schemas of the few-row float32 linear layer for cached decoding (CPU only), defined on torch.ops.varcore by
// csrc/ops.cpp.
#pragma once

#include <torch/library.h>

namespace varcore::linear {

inline void define(torch::Library& m) {
  // decode_linear_pack packs a weight (N, K) into column panels once; decode_linear(x (R, K), packed, N) =
  // x @ weight.T, (R, N).
  m.def("decode_linear_pack(Tensor weight) -> Tensor");
  m.def("decode_linear(Tensor x, Tensor packed, int out_features) -> Tensor");
  // decode_linear of rms_norm(x) = x * rsqrt(mean(x^2) + eps) * norm_weight, in one call (a decoding step's norm
  // before a projection, without the ~8 small ops of an unfused RMSNorm).
  m.def("decode_linear_rmsnorm(Tensor x, Tensor packed, int out_features, Tensor norm_weight, float eps) -> Tensor");
}

}  // namespace varcore::linear
