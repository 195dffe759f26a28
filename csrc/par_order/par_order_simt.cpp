// The PAR CUDA kernels compiled as C++ against the host emulation, exposed as varcore_simt ops for tests.
#ifndef VARCORE_SIMT
#define VARCORE_SIMT 1
#endif
#include "par_order/par_order_cuda.cu"
#include "par_order/par_order_glue.h"
#include "par_order/par_order_schema.h"

TORCH_LIBRARY_FRAGMENT(varcore_simt, m) { varcore::par_order::define(m); }

TORCH_LIBRARY_IMPL(varcore_simt, CPU, m) { varcore::par_order::impl<varcore::Simt>(m); }
