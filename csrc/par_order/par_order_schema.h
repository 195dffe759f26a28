// The schemas of the PAR order ops (spec code_par_llamagen.md B.2: raster <-> PAR order for M x M regions),
// defined on torch.ops.varcore by csrc/ops.cpp and on torch.ops.varcore_simt by par_order_simt.cpp.
#pragma once

#include <torch/library.h>

namespace varcore::par_order {

inline void define(torch::Library& m) {
  m.def("par_gather(Tensor x, int M) -> Tensor");
  m.def("par_scatter(Tensor x, int M) -> Tensor");
  m.def("par_group_scatter_(Tensor(a!) canvas, Tensor tokens, int group, int M) -> ()");
}

}  // namespace varcore::par_order
