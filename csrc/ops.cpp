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
  // VAR quantiser (spec var.md 1.3-1.7). nearest_code: argmin_v (|z|^2 + |e_v|^2) - 2 z.e_v per row of z (N, C)
  // over codebook (V, C), first minimum on ties; using_znorm: argmax of the cosine. Returns (N,) int64.
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
  // Few-row float32 linear layer for cached decoding (CPU): decode_linear_pack packs a weight (N, K) into column
  // panels once; decode_linear(x (R, K), packed, N) = x @ weight.T, (R, N).
  m.def("decode_linear_pack(Tensor weight) -> Tensor");
  m.def("decode_linear(Tensor x, Tensor packed, int out_features) -> Tensor");
  // decode_linear of rms_norm(x) = x * rsqrt(mean(x^2) + eps) * norm_weight, in one call (a decoding step's norm
  // before a projection, without the ~8 small ops of an unfused RMSNorm).
  m.def("decode_linear_rmsnorm(Tensor x, Tensor packed, int out_features, Tensor norm_weight, float eps) -> Tensor");
}
