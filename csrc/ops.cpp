// torch.ops.varcore: every family's schemas (<family>/<family>_schema.h, shared with the emulated library
// torch.ops.varcore_simt). Implementations register per dispatch key in <family>_torch.cpp.
#include <torch/library.h>

#include "attention/attention_schema.h"
#include "linear/linear_schema.h"
#include "par_order/par_order_schema.h"
#include "quant/quant_schema.h"

TORCH_LIBRARY(varcore, m) {
  varcore::par_order::define(m);
  varcore::attention::define(m);
  varcore::quant::define(m);
  varcore::linear::define(m);
}
