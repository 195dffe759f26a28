// Every varcore op's schema, in one place. Implementations register per dispatch key in <family>_torch.cpp.
#include <torch/library.h>

TORCH_LIBRARY(varcore, m) {
  // PAR token order (spec code_par_llamagen.md B.2): raster <-> PAR order for M x M regions.
  m.def("par_gather(Tensor x, int M) -> Tensor");
  m.def("par_scatter(Tensor x, int M) -> Tensor");
  m.def("par_group_scatter_(Tensor(a!) canvas, Tensor tokens, int group, int M) -> ()");
  // Block-causal attention (VAR scales, CoDe prefixes, PAR groups): query i sees keys [0, visible_end[i]).
  // layout is 'bhld' (B, H, L, D) or 'blhd' (B, L, H, D); lse is (B, H, Lq), float32 (float64 for float64 inputs).
  m.def("block_causal_attention(Tensor q, Tensor k, Tensor v, Tensor visible_end, float scale, str layout=\"bhld\")"
        " -> (Tensor out, Tensor lse)");
  m.def("block_causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor visible_end, float scale, str layout=\"bhld\", Tensor? grad_lse=None)"
        " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
