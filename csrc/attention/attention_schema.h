// The schemas of block-causal attention (VAR scales, CoDe prefixes, PAR groups), defined on torch.ops.varcore by
// csrc/ops.cpp and on torch.ops.varcore_simt by attention_simt.cpp.
#pragma once

#include <torch/library.h>

namespace varcore::attention {

inline void define(torch::Library& m) {
  // Query i sees keys [0, visible_end[i]). layout is 'bhld' (B, H, L, D) or 'blhd' (B, L, H, D); lse is
  // (B, H, Lq), float32 (float64 for float64 inputs).
  m.def("block_causal_attention(Tensor q, Tensor k, Tensor v, Tensor visible_end, float scale, str layout=\"bhld\")"
        " -> (Tensor out, Tensor lse)");
  m.def("block_causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor visible_end, float scale, str layout=\"bhld\", Tensor? grad_lse=None)"
        " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

}  // namespace varcore::attention
