// The quantiser's CUDA kernels compiled as C++ against the host emulation, exposed as varcore_simt ops for tests.
#ifndef VARCORE_SIMT
#define VARCORE_SIMT 1
#endif
#include "quant/quant_cuda.cu"
#include "quant/quant_glue.h"
#include "quant/quant_schema.h"

TORCH_LIBRARY_FRAGMENT(varcore_simt, m) { varcore::quant::define(m); }

TORCH_LIBRARY_IMPL(varcore_simt, CPU, m) { varcore::quant::impl<varcore::Simt>(m); }
