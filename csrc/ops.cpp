// Every varcore op's schema, in one place. Implementations register per dispatch key in <family>_torch.cpp.
#include <torch/library.h>

TORCH_LIBRARY(varcore, m) {
  // PAR token order (spec code_par_llamagen.md B.2): raster <-> PAR order for M x M regions.
  m.def("par_gather(Tensor x, int M) -> Tensor");
  m.def("par_scatter(Tensor x, int M) -> Tensor");
  m.def("par_group_scatter_(Tensor(a!) canvas, Tensor tokens, int group, int M) -> ()");
}
