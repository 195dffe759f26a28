// The quantiser's CUDA kernels compiled as C++ against the host emulation, exposed as varcore_simt ops for tests.
#ifndef VARCORE_SIMT
#define VARCORE_SIMT 1
#endif
#include "quant/quant_cuda.cu"
#include "quant/quant_glue.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(varcore_simt, m) {
  m.def("nearest_code(Tensor z, Tensor codebook, bool using_znorm=False) -> Tensor");
  m.def("upsample_sum(Tensor idx, Tensor codebook, int[] patch_nums, int[] groups) -> Tensor");
  m.def("msrq_encode(Tensor f, Tensor codebook, Tensor[] phi_weights, Tensor[] phi_biases, int[] phi_index, "
        "float resi_ratio, int[] patch_nums, bool using_znorm=False, bool partial_fhat=False) "
        "-> (Tensor idx, Tensor[] f_hats)");
  m.def("add_scale_(Tensor(a!) f_hat, Tensor idx, Tensor codebook, Tensor? phi_weight, Tensor? phi_bias, "
        "float resi_ratio, int next_pn, bool rows, bool channels_last) -> Tensor");
}

namespace {

const varcore::quant::Launchers& emulated() {
  using namespace varcore::quant;
  static const Launchers launchers{[](const NearestParams& p) { nearest_code_simt(p, nullptr); },
                                   [](const UpsampleSumParams& p) { upsample_sum_simt(p, nullptr); },
                                   [](const AreaParams& p) { area_simt(p, nullptr); }, kNearestCudaMaxC};
  return launchers;
}

}  // namespace

TORCH_LIBRARY_IMPL(varcore_simt, CPU, m) {
  m.impl("nearest_code", [](const at::Tensor& z, const at::Tensor& codebook, bool using_znorm) {
    return varcore::quant::nearest_code(z, codebook, using_znorm, varcore::quant::kNearestCudaMaxC,
                                        [](const varcore::quant::NearestParams& p) {
                                          varcore::quant::nearest_code_simt(p, nullptr);
                                        });
  });
  m.impl("upsample_sum", [](const at::Tensor& idx, const at::Tensor& codebook, at::IntArrayRef patch_nums,
                            at::IntArrayRef groups) {
    return varcore::quant::upsample_sum(idx, codebook, patch_nums, groups,
                                        [](const varcore::quant::UpsampleSumParams& p) {
                                          varcore::quant::upsample_sum_simt(p, nullptr);
                                        });
  });
  m.impl("msrq_encode", [](const at::Tensor& f, const at::Tensor& codebook, at::TensorList phi_weights,
                           at::TensorList phi_biases, at::IntArrayRef phi_index, double resi_ratio,
                           at::IntArrayRef patch_nums, bool using_znorm, bool partial_fhat) {
    return varcore::quant::msrq_encode(f, codebook, phi_weights, phi_biases, phi_index, resi_ratio, patch_nums,
                                       using_znorm, partial_fhat, emulated());
  });
  m.impl("add_scale_", [](at::Tensor& f_hat, const at::Tensor& idx, const at::Tensor& codebook,
                          const std::optional<at::Tensor>& phi_weight, const std::optional<at::Tensor>& phi_bias,
                          double resi_ratio, int64_t next_pn, bool rows, bool channels_last) {
    return varcore::quant::add_scale_(f_hat, idx, codebook, phi_weight, phi_bias, resi_ratio, next_pn, rows,
                                      channels_last, emulated());
  });
}
