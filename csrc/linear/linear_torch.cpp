// ATen bindings of the few-row linear layer for the CPU dispatch key (schemas: linear_schema.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

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

void check_forward(const char* op, const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, in), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              op, ": x and packed must be float32, got ", x.scalar_type(), " and ", packed.scalar_type());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              op, ": packed must come from decode_linear_pack, got ", packed.sizes());
  const int64_t width = packed.size(0) * kPanel;
  TORCH_CHECK(packed.size(1) == x.size(1), op, ": x has ", x.size(1), " features, the weight ", packed.size(1));
  TORCH_CHECK(out_features > width - kPanel && out_features <= width,
              op, ": out_features=", out_features, " does not match the packed width ", width);
}

// y = xc @ W^T for a contiguous float32 xc (already checked).
at::Tensor run(const at::Tensor& xc, const at::Tensor& packed, int64_t out_features) {
  const int64_t R = xc.size(0), K = xc.size(1), n_panels = packed.size(0), width = n_panels * kPanel;
  if (K == 0) return at::zeros({R, out_features}, xc.options());  // an empty sum; the kernel steps over K
  auto y = at::empty({R, width}, xc.options());
  if (R > 0) forward_cpu(xc.data_ptr<float>(), R, K, packed.data_ptr<float>(), n_panels, y.data_ptr<float>(), width);
  return out_features == width ? y : y.narrow(1, 0, out_features).contiguous();
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  check_forward("decode_linear", x, packed, out_features);
  return run(x.contiguous(), packed, out_features);
}

at::Tensor forward_rmsnorm(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                           const at::Tensor& norm_weight, double eps) {
  check_forward("decode_linear_rmsnorm", x, packed, out_features);
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == x.size(1) && norm_weight.scalar_type() == at::kFloat,
              "decode_linear_rmsnorm: norm_weight must be float32 of shape (", x.size(1), "), got ",
              norm_weight.scalar_type(), " ", norm_weight.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "decode_linear_rmsnorm: eps must be finite and >= 0, got ", eps);
  const auto xc = x.contiguous();
  const auto g = norm_weight.contiguous();
  auto xn = at::empty_like(xc);
  rmsnorm_cpu(xc.data_ptr<float>(), xc.size(0), xc.size(1), g.data_ptr<float>(), eps, xn.data_ptr<float>());
  return run(xn, packed, out_features);
}

}  // namespace

TORCH_LIBRARY_IMPL(varcore, CPU, m) {
  m.impl("decode_linear_pack", &pack_weight);
  m.impl("decode_linear", &forward);
  m.impl("decode_linear_rmsnorm", &forward_rmsnorm);
}

}  // namespace varcore::linear
