// Block-causal attention on the CPU and CUDA dispatch keys of torch.ops.varcore (bindings: attention_glue.h).
#include "attention/attention_glue.h"

TORCH_LIBRARY_IMPL(varcore, CPU, m) { varcore::attention::impl<varcore::Cpu>(m); }

#ifdef VARCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(varcore, CUDA, m) { varcore::attention::impl<varcore::Cuda>(m); }
#endif
