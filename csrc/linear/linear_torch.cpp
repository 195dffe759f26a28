// ATen bindings of the few-row linear layer for the CPU dispatch key (schemas: csrc/ops.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear/linear.h"

namespace varcore::linear {
namespace {

at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "decode_linear_pack: weight must be 2-D (out, in), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat, "decode_linear_pack: weight must be float32, got ", w.scalar_type());
  const auto wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1);
  auto packed = at::empty({(N + kPanel - 1) / kPanel, K, kPanel}, wc.options());
  pack_cpu(wc.data_ptr<float>(), N, K, packed.data_ptr<float>());
  return packed;
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2, "decode_linear: x must be 2-D (rows, in), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "decode_linear: x and packed must be float32, got ", x.scalar_type(), " and ", packed.scalar_type());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              "decode_linear: packed must come from decode_linear_pack, got ", packed.sizes());
  const int64_t R = x.size(0), K = x.size(1), n_panels = packed.size(0), width = n_panels * kPanel;
  TORCH_CHECK(packed.size(1) == K, "decode_linear: x has ", K, " features, the weight ", packed.size(1));
  TORCH_CHECK(out_features > width - kPanel && out_features <= width,
              "decode_linear: out_features=", out_features, " does not match the packed width ", width);
  const auto xc = x.contiguous();
  auto y = at::empty({R, width}, xc.options());
  if (R > 0) forward_cpu(xc.data_ptr<float>(), R, K, packed.data_ptr<float>(), n_panels, y.data_ptr<float>(), width);
  return out_features == width ? y : y.narrow(1, 0, out_features).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(varcore, CPU, m) {
  m.impl("decode_linear_pack", &pack_weight);
  m.impl("decode_linear", &forward);
}

}  // namespace varcore::linear
