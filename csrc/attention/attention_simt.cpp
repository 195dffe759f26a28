// The block-causal attention CUDA kernels compiled as C++ against the host emulation, exposed as varcore_simt ops
// for tests. The shared memory limit per block is VARCORE_SIMT_SMEM_KB (common/backend_torch.h).
#ifndef VARCORE_SIMT
#define VARCORE_SIMT 1
#endif
#include "attention/attention_cuda.cu"
#include "attention/attention_glue.h"
#include "attention/attention_schema.h"

TORCH_LIBRARY_FRAGMENT(varcore_simt, m) { varcore::attention::define(m); }

TORCH_LIBRARY_IMPL(varcore_simt, CPU, m) { varcore::attention::impl<varcore::Simt>(m); }
