// The ATen bindings of the quantiser ops, each templated over the backend (common/backend_torch.h): argument
// checks (before any memory is touched), params construction and the launches. impl<Backend> registers them.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/backend_torch.h"
#include "quant/quant.h"

namespace varcore::quant {

// F.normalize(x, dim=1) as the reference computes it: x / max(||x||_2, 1e-12).
inline at::Tensor normalize_rows(const at::Tensor& x) {
  return x / at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, /*keepdim=*/true).clamp_min(1e-12).expand_as(x);
}

inline void check_nearest_args(const at::Tensor& z, const at::Tensor& codebook, int64_t max_channels,
                               const char* op = "nearest_code") {
  TORCH_CHECK_VALUE(z.dim() == 2, op, ": z must be (N, C), got shape ", z.sizes());
  TORCH_CHECK_VALUE(codebook.dim() == 2, op, ": codebook must be (V, C), got shape ", codebook.sizes());
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat, op, ": z must be float32, got ", z.scalar_type());
  TORCH_CHECK_TYPE(codebook.scalar_type() == at::kFloat, op, ": codebook must be float32, got ",
                   codebook.scalar_type());
  TORCH_CHECK_VALUE(z.device() == codebook.device(), op, ": z on ", z.device(), " but codebook on ",
                    codebook.device());
  TORCH_CHECK_VALUE(z.size(1) == codebook.size(1), op, ": z has C=", z.size(1), " channels but codebook has ",
                    codebook.size(1));
  TORCH_CHECK_VALUE(codebook.size(0) >= 1 && codebook.size(0) <= std::numeric_limits<int32_t>::max(), op,
                    ": codebook must hold between 1 and 2^31 - 1 codes, got V=", codebook.size(0));
  TORCH_CHECK_VALUE(codebook.size(1) >= 1 && codebook.size(1) <= max_channels, op,
                    ": codebook must have between 1 and ", max_channels, " channels on this backend, got C=",
                    codebook.size(1));
}

// The most channels a backend's nearest-code kernel takes.
template <class Backend>
constexpr int64_t kNearestMaxC = Backend::kCudaKernels ? kNearestCudaMaxC : std::numeric_limits<int32_t>::max();

// Index (N,) int64 of the nearest code of every row of z (see quant.h for the arithmetic and tie rule).
template <class Backend>
at::Tensor nearest_code(const at::Tensor& z, const at::Tensor& codebook, bool using_znorm) {
  check_nearest_args(z, codebook, kNearestMaxC<Backend>);
  at::Tensor rows = z.contiguous(), codes = codebook.contiguous();
  at::Tensor z_norm, code_norm;
  if (using_znorm) {
    rows = normalize_rows(rows);
    codes = normalize_rows(codes);
    z_norm = at::zeros({rows.size(0)}, rows.options());
    code_norm = at::zeros({codes.size(0)}, codes.options());
  } else {
    z_norm = rows.square().sum(1);  // the reference's torch.sum(z.square(), dim=1), bit for bit
    code_norm = codes.square().sum(1);
  }
  at::Tensor idx = at::empty({rows.size(0)}, rows.options().dtype(at::kLong));
  NearestParams p;
  p.z = rows.const_data_ptr<float>();
  p.codes = codes.const_data_ptr<float>();
  p.z_norm = z_norm.const_data_ptr<float>();
  p.code_norm = code_norm.const_data_ptr<float>();
  p.idx = idx.mutable_data_ptr<int64_t>();
  p.N = rows.size(0);
  p.V = codes.size(0);
  p.C = codes.size(1);
  Backend::launch(z, [&](void* stream) { run_nearest_code<Backend>(p, stream); });
  return idx;
}

// read_values: check idx's values here (the CPU); the CUDA kernels check each token where they read it, since
// reading values on the host would synchronise the device.
inline void check_upsample_sum_args(const at::Tensor& idx, const at::Tensor& table, at::IntArrayRef patch_nums,
                                    at::IntArrayRef groups, bool read_values, const char* op = "upsample_sum") {
  TORCH_CHECK_VALUE(idx.dim() == 2, op, ": idx must be (B, L), got shape ", idx.sizes());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, op, ": idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) >= 1 && table.size(1) >= 1, op,
                    ": codebook must be a non-empty (V, C) matrix, got shape ", table.sizes());
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat, op, ": codebook must be float32, got ", table.scalar_type());
  TORCH_CHECK_VALUE(idx.device() == table.device(), op, ": idx on ", idx.device(), " but codebook on ",
                    table.device());
  TORCH_CHECK_VALUE(!patch_nums.empty() && int64_t(patch_nums.size()) <= kMaxScales, op,
                    ": patch_nums must hold 1 to ", kMaxScales, " scales, got ", patch_nums.size());
  TORCH_CHECK_VALUE(groups.size() == patch_nums.size(), op, ": groups must hold one phi group per scale (",
                    patch_nums.size(), "), got ", groups.size());
  int64_t L = 0;
  for (size_t si = 0; si < patch_nums.size(); ++si) {
    TORCH_CHECK_VALUE(patch_nums[si] >= 1 && patch_nums[si] <= 4096, op, ": patch_nums must be in [1, 4096], got ",
                      patch_nums);
    TORCH_CHECK_VALUE(groups[si] >= 0 && groups[si] < kMaxScales, op, ": groups must be in [0, ", kMaxScales,
                      "), got ", groups);
    L += patch_nums[si] * patch_nums[si];
  }
  TORCH_CHECK_VALUE(idx.size(1) == L, op, ": idx must hold sum(pn^2) = ", L, " tokens per row, got ", idx.size(1));
  if (read_values && idx.numel() > 0) {
    const auto [lo, hi] = at::aminmax(idx);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < table.size(0), op, ": idx values must be in [0, ",
                      table.size(0), "), got [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
}

// Per phi group, the sum of the group's bicubic-upsampled token maps: (B, K*C, H, H) with H the last patch size
// and K = max(groups) + 1 (see quant.h).
template <class Backend>
at::Tensor upsample_sum(const at::Tensor& idx, const at::Tensor& table, at::IntArrayRef patch_nums,
                        at::IntArrayRef groups) {
  check_upsample_sum_args(idx, table, patch_nums, groups, !Backend::kCudaKernels);
  const at::Tensor tokens = idx.contiguous(), rows = table.contiguous();
  UpsampleSumParams p;
  p.B = tokens.size(0);
  p.L = tokens.size(1);
  p.V = rows.size(0);
  p.C = rows.size(1);
  p.H = patch_nums.back();
  p.K = *std::max_element(groups.begin(), groups.end()) + 1;
  p.scales = int(patch_nums.size());
  p.channels_last = false;
  int64_t offset = 0;
  for (int si = 0; si < p.scales; ++si) {
    p.pn[si] = int(patch_nums[si]);
    p.group[si] = int(groups[si]);
    p.offset[si] = offset;
    offset += patch_nums[si] * patch_nums[si];
  }
  at::Tensor out = at::empty({p.B, p.K * p.C, p.H, p.H}, rows.options());
  p.idx = tokens.const_data_ptr<int64_t>();
  p.table = rows.const_data_ptr<float>();
  p.out = out.mutable_data_ptr<float>();
  Backend::launch(idx, [&](void* stream) { run_upsample_sum<Backend>(p, stream); });
  return out;
}

// ---------------------------------------------------------------------------------------------- encode
// f (B, C, H, W) contiguous, area-downsampled to pn x pn: token rows (B*pn*pn, C) or a (B, C, pn, pn) map.
template <class Backend>
at::Tensor area_downsample(const at::Tensor& f, int64_t pn, bool rows) {
  const int64_t B = f.size(0), C = f.size(1);
  // ATen's adaptive average pooling to 1 x 1 is a mean (a different summation order): take that one.
  if (pn == 1) return rows ? f.mean({2, 3}) : f.mean({2, 3}, /*keepdim=*/true);
  at::Tensor out = rows ? at::empty({B * pn * pn, C}, f.options()) : at::empty({B, C, pn, pn}, f.options());
  AreaParams a{f.const_data_ptr<float>(), out.mutable_data_ptr<float>(), B, C, f.size(2), f.size(3), pn, pn,
               pn * pn * C, rows ? 1 : pn * pn, rows ? pn * C : pn, rows ? C : 1};
  if (out.numel() > 0) Backend::launch(f, [&](void* stream) { run_area<Backend>(a, stream); });
  return out;
}

// The code maps table[idx] (idx (B, pn*pn), contiguous) bicubic-upsampled to (B, C, H, H) (copied when pn == H),
// in channels-last memory if asked (the layout decides which path, and so which rounding, phi's conv takes).
template <class Backend>
at::Tensor upsample_codes(const at::Tensor& idx, const at::Tensor& table, int64_t pn, int64_t H, bool channels_last) {
  at::Tensor out = at::empty({idx.size(0), table.size(1), H, H},
                             table.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                         : at::MemoryFormat::Contiguous));
  UpsampleSumParams u{};
  u.idx = idx.const_data_ptr<int64_t>();
  u.table = table.const_data_ptr<float>();
  u.out = out.mutable_data_ptr<float>();
  u.B = idx.size(0);
  u.L = pn * pn;
  u.V = table.size(0);
  u.C = table.size(1);
  u.H = H;
  u.K = 1;
  u.scales = 1;
  u.pn[0] = int(pn);
  u.channels_last = channels_last;
  if (out.numel() > 0) Backend::launch(out, [&](void* stream) { run_upsample_sum<Backend>(u, stream); });
  return out;
}

inline void check_msrq_args(const at::Tensor& f, const at::Tensor& codebook, at::TensorList phi_weights,
                            at::TensorList phi_biases, at::IntArrayRef phi_index, at::IntArrayRef patch_nums,
                            int64_t max_channels, const char* op = "msrq_encode") {
  TORCH_CHECK_VALUE(f.dim() == 4, op, ": f must be (B, C, H, W), got shape ", f.sizes());
  TORCH_CHECK_TYPE(f.scalar_type() == at::kFloat, op, ": f must be float32, got ", f.scalar_type());
  check_nearest_args(f.new_empty({0, f.size(1)}), codebook, max_channels, op);
  TORCH_CHECK_VALUE(!patch_nums.empty() && int64_t(patch_nums.size()) <= kMaxScales, op,
                    ": patch_nums must hold 1 to ", kMaxScales, " scales, got ", patch_nums.size());
  for (int64_t pn : patch_nums) {
    TORCH_CHECK_VALUE(pn >= 1 && pn <= patch_nums.back(), op, ": patch_nums must be in [1, patch_nums[-1]], got ",
                      patch_nums);
  }
  TORCH_CHECK_VALUE(f.size(2) == patch_nums.back() && f.size(3) == patch_nums.back(), op,
                    ": f must be ", patch_nums.back(), " x ", patch_nums.back(), " (the last patch size), got ",
                    f.sizes());
  TORCH_CHECK_VALUE(phi_weights.size() == phi_biases.size(), op, ": phi_weights and phi_biases differ in length (",
                    phi_weights.size(), " vs ", phi_biases.size(), ")");
  TORCH_CHECK_VALUE(phi_weights.empty() || phi_index.size() == patch_nums.size(), op,
                    ": phi_index must hold one phi per scale (", patch_nums.size(), "), got ", phi_index.size());
  const int64_t C = f.size(1);
  for (size_t k = 0; k < phi_weights.size(); ++k) {
    const at::Tensor& w = phi_weights[k];
    const at::Tensor& b = phi_biases[k];
    TORCH_CHECK_VALUE(w.sizes() == at::IntArrayRef({C, C, 3, 3}) && b.sizes() == at::IntArrayRef({C}), op,
                      ": phi ", k, " must have a (", C, ", ", C, ", 3, 3) weight and a (", C, ",) bias, got ",
                      w.sizes(), " and ", b.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, op,
                     ": phi weights and biases must be float32");
    TORCH_CHECK_VALUE(w.device() == f.device() && b.device() == f.device(), op, ": phi ", k, " is not on ",
                      f.device());
  }
  for (int64_t k : phi_index) {
    TORCH_CHECK_VALUE(phi_weights.empty() || (k >= 0 && k < int64_t(phi_weights.size())), op,
                      ": phi_index must be in [0, ", phi_weights.size(), "), got ", phi_index);
  }
}

// phi(h) = (1 - r) h + r conv3x3(h), in the reference's operation order; the identity without weights.
inline at::Tensor apply_phi(const at::Tensor& h, at::TensorList weights, at::TensorList biases, int64_t k, double r) {
  if (weights.empty()) return h;
  return h.mul(1 - r) + at::conv2d(h, weights[k], biases[k], 1, 1).mul_(r);
}

// Multi-scale residual quantisation of f (spec var.md 1.4): returns the indices of every scale packed as (B, L)
// and f_hat after every scale (partial_fhat) or after the last one only. Per scale: area-downsample the residual
// straight into token rows (the last scale reads it as is), nearest code, then the code map gathered and
// bicubic-upsampled in one kernel, phi, and the residual update.
template <class Backend>
std::tuple<at::Tensor, std::vector<at::Tensor>> msrq_encode(const at::Tensor& f, const at::Tensor& codebook,
                                                            at::TensorList phi_weights, at::TensorList phi_biases,
                                                            at::IntArrayRef phi_index, double resi_ratio,
                                                            at::IntArrayRef patch_nums, bool using_znorm,
                                                            bool partial_fhat) {
  check_msrq_args(f, codebook, phi_weights, phi_biases, phi_index, patch_nums, kNearestMaxC<Backend>);
  const int64_t B = f.size(0), C = f.size(1), H = f.size(2);
  const int SN = int(patch_nums.size());
  int64_t L = 0;
  for (int64_t pn : patch_nums) L += pn * pn;
  const at::Tensor table = codebook.contiguous();
  at::Tensor f_rest = f.contiguous().clone();
  at::Tensor f_hat = at::zeros_like(f_rest);
  at::Tensor idx = at::empty({B, L}, f.options().dtype(at::kLong));
  std::vector<at::Tensor> f_hats;
  int64_t offset = 0;
  for (int si = 0; si < SN; ++si) {
    const int64_t pn = patch_nums[si];
    const bool last = si == SN - 1;
    // The last scale reads the residual as it is (and its code map is copied, not resized, below).
    const at::Tensor rows =
        last ? f_rest.permute({0, 2, 3, 1}).reshape({-1, C}) : area_downsample<Backend>(f_rest, pn, true);
    const at::Tensor idx_si = nearest_code<Backend>(rows, table, using_znorm).view({B, pn * pn});
    idx.narrow(1, offset, pn * pn).copy_(idx_si);
    at::Tensor h = upsample_codes<Backend>(idx_si, table, pn, H, /*channels_last=*/false);  // as .contiguous()
    h = apply_phi(h, phi_weights, phi_biases, phi_weights.empty() ? 0 : phi_index[si], resi_ratio);
    f_hat.add_(h);
    f_rest.sub_(h);
    if (partial_fhat) f_hats.push_back(f_hat.clone());
    offset += pn * pn;
  }
  if (!partial_fhat) f_hats.push_back(f_hat);
  return {idx, f_hats};
}

// ---------------------------------------------------------------------------------------------- decode steps
// One step of the sampler and of the teacher-forcing input (spec var.md 1.5, 1.6): f_hat += phi(up(table[idx]))
// in place (idx (B, pn^2), bicubic to f_hat's size, a copy when pn is that size; up in channels-last memory when
// channels_last, as the reference's interpolation of a transposed embedding is), then f_hat area-downsampled to
// next_pn: token rows (B, next_pn^2, C) or a (B, C, next_pn, next_pn) map (empty when next_pn is 0, the last scale).
template <class Backend>
at::Tensor add_scale_(at::Tensor& f_hat, const at::Tensor& idx, const at::Tensor& table,
                      const std::optional<at::Tensor>& phi_weight, const std::optional<at::Tensor>& phi_bias,
                      double resi_ratio, int64_t next_pn, bool rows, bool channels_last) {
  constexpr const char* op = "add_scale_";
  TORCH_CHECK_VALUE(f_hat.dim() == 4 && f_hat.size(2) == f_hat.size(3) && f_hat.is_contiguous(), op,
                    ": f_hat must be a contiguous (B, C, H, H) map (it is written in place), got shape ",
                    f_hat.sizes());
  TORCH_CHECK_TYPE(f_hat.scalar_type() == at::kFloat, op, ": f_hat must be float32, got ", f_hat.scalar_type());
  const int64_t B = f_hat.size(0), C = f_hat.size(1), H = f_hat.size(2);
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == C, op, ": codebook must be (V, ", C, "), got shape ",
                    table.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == B, op, ": idx must be (", B, ", pn^2), got shape ", idx.sizes());
  int64_t pn = 0;
  while ((pn + 1) * (pn + 1) <= idx.size(1)) ++pn;
  TORCH_CHECK_VALUE(pn * pn == idx.size(1) && pn >= 1 && pn <= H, op, ": idx must hold pn^2 tokens for a pn in [1, ",
                    H, "], got ", idx.size(1));
  TORCH_CHECK_VALUE(next_pn >= 0 && next_pn <= H, op, ": next_pn must be in [0, ", H, "], got ", next_pn);
  TORCH_CHECK_VALUE(phi_weight.has_value() == phi_bias.has_value(), op, ": give phi_weight and phi_bias together");
  std::vector<at::Tensor> weights, biases;
  if (phi_weight.has_value()) {
    weights.push_back(*phi_weight);
    biases.push_back(*phi_bias);
  }
  check_msrq_args(f_hat, table, weights, biases, at::IntArrayRef{0}, at::IntArrayRef{H}, kNearestMaxC<Backend>, op);
  check_upsample_sum_args(idx, table, at::IntArrayRef{pn}, at::IntArrayRef{0}, !Backend::kCudaKernels, op);
  const at::Tensor tokens = idx.contiguous(), codes = table.contiguous();
  f_hat.add_(
      apply_phi(upsample_codes<Backend>(tokens, codes, pn, H, channels_last), weights, biases, 0, resi_ratio));
  at::Tensor next = area_downsample<Backend>(f_hat, next_pn, rows);
  return rows ? next.view({B, next_pn * next_pn, C}) : next;
}

// The ops on one backend, for a TORCH_LIBRARY_IMPL block (schemas: quant_schema.h).
template <class Backend>
void impl(torch::Library& m) {
  m.impl("nearest_code", &nearest_code<Backend>);
  m.impl("upsample_sum", &upsample_sum<Backend>);
  m.impl("msrq_encode", &msrq_encode<Backend>);
  m.impl("add_scale_", &add_scale_<Backend>);
}

}  // namespace varcore::quant
