// ATen bindings of the quantiser ops for the CPU and CUDA dispatch keys (schemas: csrc/ops.cpp).
#include <torch/library.h>

#include <limits>
#include <optional>

#include "quant/quant_glue.h"

#ifdef VARCORE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace varcore::quant {
namespace {

at::Tensor nearest_code_on_cpu(const at::Tensor& z, const at::Tensor& codebook, bool using_znorm) {
  return nearest_code(z, codebook, using_znorm, std::numeric_limits<int32_t>::max(),
                      [](const NearestParams& p) { nearest_code_cpu(p); });
}

at::Tensor upsample_sum_on_cpu(const at::Tensor& idx, const at::Tensor& codebook, at::IntArrayRef patch_nums,
                               at::IntArrayRef groups) {
  return upsample_sum(idx, codebook, patch_nums, groups, [](const UpsampleSumParams& p) { upsample_sum_cpu(p); });
}

std::tuple<at::Tensor, std::vector<at::Tensor>> msrq_encode_on_cpu(
    const at::Tensor& f, const at::Tensor& codebook, at::TensorList phi_weights, at::TensorList phi_biases,
    at::IntArrayRef phi_index, double resi_ratio, at::IntArrayRef patch_nums, bool using_znorm, bool partial_fhat) {
  const Launchers cpu{nearest_code_cpu, upsample_sum_cpu, area_cpu, std::numeric_limits<int32_t>::max()};
  return msrq_encode(f, codebook, phi_weights, phi_biases, phi_index, resi_ratio, patch_nums, using_znorm,
                     partial_fhat, cpu);
}

at::Tensor add_scale_on_cpu(at::Tensor& f_hat, const at::Tensor& idx, const at::Tensor& codebook,
                            const std::optional<at::Tensor>& phi_weight, const std::optional<at::Tensor>& phi_bias,
                            double resi_ratio, int64_t next_pn, bool rows, bool channels_last) {
  const Launchers cpu{nearest_code_cpu, upsample_sum_cpu, area_cpu, std::numeric_limits<int32_t>::max()};
  return add_scale_(f_hat, idx, codebook, phi_weight, phi_bias, resi_ratio, next_pn, rows, channels_last, cpu);
}

#ifdef VARCORE_WITH_CUDA
// Launches on the current stream of the input's device (matters under CUDA graphs and torch.compile).
at::Tensor nearest_code_on_cuda(const at::Tensor& z, const at::Tensor& codebook, bool using_znorm) {
  const c10::cuda::CUDAGuard guard(z.device());
  return nearest_code(z, codebook, using_znorm, kNearestCudaMaxC, [&](const NearestParams& p) {
    nearest_code_cuda(p, at::cuda::getCurrentCUDAStream(z.device().index()).stream());
  });
}

at::Tensor upsample_sum_on_cuda(const at::Tensor& idx, const at::Tensor& codebook, at::IntArrayRef patch_nums,
                                at::IntArrayRef groups) {
  const c10::cuda::CUDAGuard guard(idx.device());
  return upsample_sum(idx, codebook, patch_nums, groups, [&](const UpsampleSumParams& p) {
    upsample_sum_cuda(p, at::cuda::getCurrentCUDAStream(idx.device().index()).stream());
  });
}

// The CUDA kernels on the current stream of t's device.
Launchers cuda_launchers(const at::Tensor& t) {
  void* stream = at::cuda::getCurrentCUDAStream(t.device().index()).stream();
  return {[stream](const NearestParams& p) { nearest_code_cuda(p, stream); },
          [stream](const UpsampleSumParams& p) { upsample_sum_cuda(p, stream); },
          [stream](const AreaParams& p) { area_cuda(p, stream); }, kNearestCudaMaxC};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> msrq_encode_on_cuda(
    const at::Tensor& f, const at::Tensor& codebook, at::TensorList phi_weights, at::TensorList phi_biases,
    at::IntArrayRef phi_index, double resi_ratio, at::IntArrayRef patch_nums, bool using_znorm, bool partial_fhat) {
  const c10::cuda::CUDAGuard guard(f.device());
  return msrq_encode(f, codebook, phi_weights, phi_biases, phi_index, resi_ratio, patch_nums, using_znorm,
                     partial_fhat, cuda_launchers(f));
}

at::Tensor add_scale_on_cuda(at::Tensor& f_hat, const at::Tensor& idx, const at::Tensor& codebook,
                             const std::optional<at::Tensor>& phi_weight, const std::optional<at::Tensor>& phi_bias,
                             double resi_ratio, int64_t next_pn, bool rows, bool channels_last) {
  const c10::cuda::CUDAGuard guard(f_hat.device());
  return add_scale_(f_hat, idx, codebook, phi_weight, phi_bias, resi_ratio, next_pn, rows, channels_last,
                    cuda_launchers(f_hat));
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(varcore, CPU, m) {
  m.impl("nearest_code", &nearest_code_on_cpu);
  m.impl("upsample_sum", &upsample_sum_on_cpu);
  m.impl("msrq_encode", &msrq_encode_on_cpu);
  m.impl("add_scale_", &add_scale_on_cpu);
}

#ifdef VARCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(varcore, CUDA, m) {
  m.impl("nearest_code", &nearest_code_on_cuda);
  m.impl("upsample_sum", &upsample_sum_on_cuda);
  m.impl("msrq_encode", &msrq_encode_on_cuda);
  m.impl("add_scale_", &add_scale_on_cuda);
}
#endif

}  // namespace varcore::quant
