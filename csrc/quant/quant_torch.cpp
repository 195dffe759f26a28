// The quantiser ops on the CPU and CUDA dispatch keys of torch.ops.varcore (bindings: quant_glue.h).
#include "quant/quant_glue.h"

TORCH_LIBRARY_IMPL(varcore, CPU, m) { varcore::quant::impl<varcore::Cpu>(m); }

#ifdef VARCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(varcore, CUDA, m) { varcore::quant::impl<varcore::Cuda>(m); }
#endif
