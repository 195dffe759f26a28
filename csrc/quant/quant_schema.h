// The schemas of VAR's quantiser ops (spec var.md 1.3-1.7), defined on torch.ops.varcore by csrc/ops.cpp and on
// torch.ops.varcore_simt by quant_simt.cpp.
#pragma once

#include <torch/library.h>

namespace varcore::quant {

inline void define(torch::Library& m) {
  // nearest_code: argmin_v (|z|^2 + |e_v|^2) - 2 z.e_v per row of z (N, C) over codebook (V, C), first minimum on
  // ties; using_znorm: argmax of the cosine. Returns (N,) int64.
  m.def("nearest_code(Tensor z, Tensor codebook, bool using_znorm=False) -> Tensor");
  // upsample_sum: token pyramid idx (B, sum pn^2) -> per phi group the sum of the bicubic-upsampled code maps,
  // (B, K*C, H, H) with H = patch_nums[-1], K = max(groups) + 1 and groups[si] the phi group of scale si.
  m.def("upsample_sum(Tensor idx, Tensor codebook, int[] patch_nums, int[] groups) -> Tensor");
  // msrq_encode: multi-scale residual quantisation of f (B, C, H, H), H = patch_nums[-1]; phi k (weights[k],
  // biases[k], ratio r) at scale si is k = phi_index[si], none (identity) when phi_weights is empty. Returns the
  // indices of every scale packed as (B, sum pn^2) and f_hat after every scale (partial_fhat) or the last only.
  m.def("msrq_encode(Tensor f, Tensor codebook, Tensor[] phi_weights, Tensor[] phi_biases, int[] phi_index, "
        "float resi_ratio, int[] patch_nums, bool using_znorm=False, bool partial_fhat=False) "
        "-> (Tensor idx, Tensor[] f_hats)");
  // add_scale_: one decode step, f_hat (B, C, H, H) += phi(bicubic(codebook[idx])) in place (idx (B, pn^2); phi the
  // identity without weights), returning f_hat area-downsampled to next_pn as rows (B, next_pn^2, C) or a
  // (B, C, next_pn, next_pn) map (empty for next_pn = 0).
  m.def("add_scale_(Tensor(a!) f_hat, Tensor idx, Tensor codebook, Tensor? phi_weight, Tensor? phi_bias, "
        "float resi_ratio, int next_pn, bool rows, bool channels_last) -> Tensor");
}

}  // namespace varcore::quant
