// ATen bindings of block-causal attention for the CPU and CUDA dispatch keys (schemas: csrc/ops.cpp).
#include <torch/library.h>

#include "attention/attention_glue.h"

#ifdef VARCORE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace varcore::attention {
namespace {

constexpr Backend kCpu{/*float64=*/true, /*dq_accum=*/false, /*smem_limit=*/0};

std::tuple<at::Tensor, at::Tensor> forward_on_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& visible_end, double scale,
                                                  c10::string_view layout) {
  return forward(q, k, v, visible_end, scale, layout, kCpu, [](const ForwardParams& p) { forward_cpu(p); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_on_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& visible_end, double scale, c10::string_view layout,
    const std::optional<at::Tensor>& grad_lse) {
  return backward(grad_out, q, k, v, out, lse, visible_end, scale, layout, grad_lse, kCpu,
                  [](const BackwardParams& p) { backward_cpu(p); });
}

#ifdef VARCORE_WITH_CUDA
Backend cuda_backend(const at::Tensor& t) {
  const auto* props = at::cuda::getDeviceProperties(t.device().index());
  return Backend{false, true, props->sharedMemPerBlockOptin};
}

std::tuple<at::Tensor, at::Tensor> forward_on_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& visible_end, double scale,
                                                   c10::string_view layout) {
  const c10::cuda::CUDAGuard guard(q.device());
  return forward(q, k, v, visible_end, scale, layout, cuda_backend(q), [&q](const ForwardParams& p) {
    forward_cuda(p, at::cuda::getCurrentCUDAStream(q.device().index()).stream());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_on_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& visible_end, double scale, c10::string_view layout,
    const std::optional<at::Tensor>& grad_lse) {
  const c10::cuda::CUDAGuard guard(q.device());
  return backward(grad_out, q, k, v, out, lse, visible_end, scale, layout, grad_lse, cuda_backend(q),
                  [&q](const BackwardParams& p) {
                    backward_cuda(p, at::cuda::getCurrentCUDAStream(q.device().index()).stream());
                  });
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(varcore, CPU, m) {
  m.impl("block_causal_attention", &forward_on_cpu);
  m.impl("block_causal_attention_backward", &backward_on_cpu);
}

#ifdef VARCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(varcore, CUDA, m) {
  m.impl("block_causal_attention", &forward_on_cuda);
  m.impl("block_causal_attention_backward", &backward_on_cuda);
}
#endif

}  // namespace varcore::attention
