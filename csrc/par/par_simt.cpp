// The PAR CUDA kernels compiled as C++ against the host emulation, exposed as varcore_simt ops for tests.
#ifndef VARCORE_SIMT
#define VARCORE_SIMT 1
#endif
#include "par/par_cuda.cu"
#include "par/par_glue.h"

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(varcore_simt, m) {
  m.def("par_gather(Tensor x, int M) -> Tensor");
  m.def("par_scatter(Tensor x, int M) -> Tensor");
  m.def("par_group_scatter_(Tensor(a!) canvas, Tensor tokens, int group, int M) -> ()");
}

TORCH_LIBRARY_IMPL(varcore_simt, CPU, m) {
  using varcore::par::CopyParams;
  static constexpr auto emulated = [](const CopyParams& p) { varcore::par::copy_simt(p, nullptr); };
  m.impl("par_gather", [](const at::Tensor& x, int64_t M) { return varcore::par::gather(x, M, emulated); });
  m.impl("par_scatter", [](const at::Tensor& x, int64_t M) { return varcore::par::scatter(x, M, emulated); });
  m.impl("par_group_scatter_", [](at::Tensor& canvas, const at::Tensor& tokens, int64_t group, int64_t M) {
    varcore::par::group_scatter_(canvas, tokens, group, M, emulated);
  });
}
