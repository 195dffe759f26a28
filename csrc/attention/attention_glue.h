// The ATen bindings of block-causal attention, each templated over the backend (common/backend_torch.h):
// argument checks (all before any output is allocated or any kernel runs), the (B, H, L, D) views of both layouts,
// params construction and the launch. impl<Backend> registers them.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>

#include "attention/attention.h"
#include "common/backend_torch.h"

namespace varcore::attention {

// Inputs as (B, H, L, D) views with a contiguous head dimension, and the mask as int32.
struct Inputs {
  at::Tensor q, k, v, visible_end;
  bool blhd;
  int64_t B, H, Lq, Lk, D;
};

inline bool parse_layout(std::string_view layout, const char* op) {
  TORCH_CHECK_VALUE(layout == "bhld" || layout == "blhd", op, ": layout must be 'bhld' (B, H, L, D) or 'blhd' ",
                    "(B, L, H, D), got '", std::string(layout), "'");
  return layout == "blhd";
}

// A tensor of the given layout as a (B, H, L, D) view whose last dimension has stride 1.
inline at::Tensor bhld_view(const at::Tensor& t, bool blhd) {
  at::Tensor v = blhd ? t.transpose(1, 2) : t;
  return v.stride(3) == 1 || v.size(3) <= 1 ? v : v.contiguous();
}

inline View view_of(const at::Tensor& t) {
  return View{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: return DType::kFloat32;
  }
}

inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// cpu: the CPU kernels, which accept float64 inputs (for gradcheck) and whose visible_end values are checked
// here; the CUDA kernels check each value where they read it (reading them here would synchronise the device).
inline Inputs check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& visible_end, double scale, std::string_view layout, bool cpu,
                           const char* op) {
  const bool float64 = cpu;
  const bool blhd = parse_layout(layout, op);
  const char* shape = blhd ? "(B, L, H, D)" : "(B, H, L, D)";
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name, " must be 4-D ", shape, ", got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but q on ", q.device());
  }
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (st == at::kDouble && float64),
                   op, ": q must be float32, float16 or bfloat16", float64 ? " (or float64)" : "",
                   ", got ", st);
  TORCH_CHECK_TYPE(k.scalar_type() == st && v.scalar_type() == st, op, ": q, k and v must share a dtype, got ", st,
                   ", ", k.scalar_type(), ", ", v.scalar_type());
  const int l_dim = blhd ? 1 : 2, h_dim = blhd ? 2 : 1;
  const int64_t B = q.size(0), H = q.size(h_dim), Lq = q.size(l_dim), Lk = k.size(l_dim), D = q.size(3);
  TORCH_CHECK_VALUE(k.size(0) == B && v.size(0) == B && k.size(h_dim) == H && v.size(h_dim) == H, op,
                    ": q, k and v must have the same batch and head counts ", shape, ", got ", q.sizes(), ", ",
                    k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(v.size(l_dim) == Lk, op, ": k and v must have the same length, got ", k.sizes(), " and ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(3) == D && v.size(3) == D, op, ": q, k and v must have the same head dim, got ",
                    q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(D >= 1 && D <= kMaxHeadDim, op, ": head dim must be in [1, ", kMaxHeadDim, "], got ", D);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);

  TORCH_CHECK_TYPE(visible_end.scalar_type() == at::kInt || visible_end.scalar_type() == at::kLong, op,
                   ": visible_end must be int32 or int64, got ", visible_end.scalar_type());
  TORCH_CHECK_VALUE(visible_end.dim() == 1 && visible_end.size(0) == Lq, op,
                    ": visible_end must have shape (Lq,) = (", Lq, ",), got ", visible_end.sizes());
  TORCH_CHECK_VALUE(visible_end.device() == q.device(), op, ": visible_end is on ", visible_end.device(),
                    " but q on ", q.device());
  if (cpu && Lq > 0) {
    const auto [lo, hi] = at::aminmax(visible_end);
    const int64_t min_end = lo.item<int64_t>(), max_end = hi.item<int64_t>();
    TORCH_CHECK_VALUE(min_end >= 0 && max_end <= Lk, op, ": visible_end values must be in [0, Lk] = [0, ", Lk,
                      "], got min ", min_end, ", max ", max_end);
  }
  return Inputs{bhld_view(q, blhd), bhld_view(k, blhd), bhld_view(v, blhd),
                visible_end.to(at::kInt).contiguous(), blhd, B, H, Lq, Lk, D};
}

// An output in the caller's layout with the shape of like (B, H, L, D), and its (B, H, L, D) view.
inline std::pair<at::Tensor, at::Tensor> new_output(const Inputs& in, int64_t L, at::ScalarType dtype,
                                                    const at::Tensor& like) {
  const auto opts = like.options().dtype(dtype);
  if (in.blhd) {
    at::Tensor t = at::empty({in.B, L, in.H, in.D}, opts);
    return {t, t.transpose(1, 2)};
  }
  at::Tensor t = at::empty({in.B, in.H, L, in.D}, opts);
  return {t, t};
}

// The fields the forward and the backward share: the checked inputs, the forward's output (out_view, its
// (B, H, L, D) view) and lse.
template <class Backend>
void set_params(ForwardParams& p, const Inputs& in, const at::Tensor& out_view, const at::Tensor& lse, double scale) {
  p.q = view_of(in.q);
  p.k = view_of(in.k);
  p.v = view_of(in.v);
  p.out = view_of(out_view);
  p.lse = lse.data_ptr();
  p.visible_end = in.visible_end.data_ptr<int32_t>();
  p.B = in.B;
  p.H = in.H;
  p.Lq = in.Lq;
  p.Lk = in.Lk;
  p.D = in.D;
  p.scale = scale;
  p.dtype = dtype_of(in.q);
  if constexpr (Backend::kCudaKernels) {
    p.smem_limit = Backend::smem_limit(in.q);
  } else {
    p.smem_limit = 0;
  }
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& visible_end, double scale, c10::string_view layout) {
  const Inputs in = check_inputs(q, k, v, visible_end, scale, layout, !Backend::kCudaKernels,
                                 "block_causal_attention");
  auto [out, out_view] = new_output(in, in.Lq, q.scalar_type(), q);
  at::Tensor lse = at::empty({in.B, in.H, in.Lq}, q.options().dtype(acc_type(q)));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  ForwardParams p;
  set_params<Backend>(p, in, out_view, lse, scale);
  Backend::launch(q, [&](void* stream) { run_forward<Backend>(p, stream); });
  return {out, lse};
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& visible_end, double scale, c10::string_view layout,
    const std::optional<at::Tensor>& grad_lse) {
  const char* op = "block_causal_attention_backward";
  // The CUDA kernels accumulate dq in a float32 buffer.
  constexpr bool accumulate_dq = Backend::kCudaKernels;
  const Inputs in = check_inputs(q, k, v, visible_end, scale, layout, !Backend::kCudaKernels, op);
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), op, ": ", name, " must have the shape of q ", q.sizes(), ", got ",
                      t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of q (",
                     q.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " is on ", t->device(), " but q on ", q.device());
  }
  const std::array<int64_t, 3> lse_shape_{in.B, in.H, in.Lq};
  const at::IntArrayRef lse_shape(lse_shape_);
  const auto lse_dtype = acc_type(q);
  TORCH_CHECK_VALUE(lse.sizes() == lse_shape && lse.device() == q.device(), op, ": lse must have shape ", lse_shape,
                    " on ", q.device(), ", got ", lse.sizes(), " on ", lse.device());
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype, op, ": lse must be ", lse_dtype, ", got ", lse.scalar_type());
  if (grad_lse.has_value()) {
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse_shape && grad_lse->device() == q.device(), op,
                      ": grad_lse must have shape ", lse_shape, " on ", q.device(), ", got ", grad_lse->sizes());
  }

  auto [dq, dq_view] = new_output(in, in.Lq, q.scalar_type(), q);
  auto [dk, dk_view] = new_output(in, in.Lk, q.scalar_type(), q);
  auto [dv, dv_view] = new_output(in, in.Lk, q.scalar_type(), q);
  if (dk.numel() == 0) {
    dq.zero_();
    return {dq, dk, dv};
  }
  // delta_i = sum_d dout_id out_id (the softmax Jacobian term), minus grad_lse_i, since d lse_i / d s_ij = p_ij.
  // Batched dot products need no (B, H, L, D) temporary; 16-bit inputs are widened first for a float32 delta.
  const at::Tensor dout_view = bhld_view(grad_out, in.blhd), out_view = bhld_view(out, in.blhd);
  at::Tensor delta = q.scalar_type() == lse_dtype
                         ? at::matmul(dout_view.unsqueeze(-2), out_view.unsqueeze(-1)).squeeze(-1).squeeze(-1)
                         : (dout_view.to(lse_dtype) * out_view.to(lse_dtype)).sum(-1);
  if (grad_lse.has_value()) delta = delta - grad_lse->to(lse_dtype);
  delta = delta.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq_accum;
  if (accumulate_dq) dq_accum = at::zeros({in.B, in.H, in.Lq, in.D}, q.options().dtype(at::kFloat));

  BackwardParams p;
  set_params<Backend>(p, in, out_view, lse_c, scale);
  p.dout = view_of(dout_view);
  p.dq = view_of(dq_view);
  p.dk = view_of(dk_view);
  p.dv = view_of(dv_view);
  p.delta = delta.data_ptr();
  p.dq_accum = accumulate_dq ? dq_accum.data_ptr<float>() : nullptr;
  Backend::launch(q, [&](void* stream) { run_backward<Backend>(p, stream); });
  if (accumulate_dq) dq_view.copy_(dq_accum);
  return {dq, dk, dv};
}

// The ops on one backend, for a TORCH_LIBRARY_IMPL block (schemas: attention_schema.h).
template <class Backend>
void impl(torch::Library& m) {
  m.impl("block_causal_attention", &forward<Backend>);
  m.impl("block_causal_attention_backward", &backward<Backend>);
}

}  // namespace varcore::attention
