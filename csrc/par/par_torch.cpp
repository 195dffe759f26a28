// ATen bindings of the PAR order ops for the CPU and CUDA dispatch keys (schemas: csrc/ops.cpp).
#include <torch/library.h>

#include "par/par_glue.h"

#ifdef VARCORE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace varcore::par {
namespace {

void on_cpu(const CopyParams& p) { copy_cpu(p); }

at::Tensor gather_cpu(const at::Tensor& x, int64_t M) { return gather(x, M, on_cpu); }
at::Tensor scatter_cpu(const at::Tensor& x, int64_t M) { return scatter(x, M, on_cpu); }
void group_scatter_cpu(at::Tensor& canvas, const at::Tensor& tokens, int64_t group, int64_t M) {
  group_scatter_(canvas, tokens, group, M, on_cpu);
}

#ifdef VARCORE_WITH_CUDA
// Launches on the current stream of the input's device (matters under CUDA graphs and torch.compile).
auto on_cuda(const at::Tensor& t) {
  return [&t](const CopyParams& p) {
    const c10::cuda::CUDAGuard guard(t.device());
    copy_cuda(p, at::cuda::getCurrentCUDAStream(t.device().index()).stream());
  };
}

at::Tensor gather_cuda(const at::Tensor& x, int64_t M) { return gather(x, M, on_cuda(x)); }
at::Tensor scatter_cuda(const at::Tensor& x, int64_t M) { return scatter(x, M, on_cuda(x)); }
void group_scatter_cuda(at::Tensor& canvas, const at::Tensor& tokens, int64_t group, int64_t M) {
  group_scatter_(canvas, tokens, group, M, on_cuda(canvas));
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(varcore, CPU, m) {
  m.impl("par_gather", &gather_cpu);
  m.impl("par_scatter", &scatter_cpu);
  m.impl("par_group_scatter_", &group_scatter_cpu);
}

#ifdef VARCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(varcore, CUDA, m) {
  m.impl("par_gather", &gather_cuda);
  m.impl("par_scatter", &scatter_cuda);
  m.impl("par_group_scatter_", &group_scatter_cuda);
}
#endif

}  // namespace varcore::par
