// The PAR order ops on the CPU and CUDA dispatch keys of torch.ops.varcore (bindings: par_order_glue.h).
#include "par_order/par_order_glue.h"

TORCH_LIBRARY_IMPL(varcore, CPU, m) { varcore::par_order::impl<varcore::Cpu>(m); }

#ifdef VARCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(varcore, CUDA, m) { varcore::par_order::impl<varcore::Cuda>(m); }
#endif
