// The ATen bindings of the PAR order ops, each templated over the backend (common/backend_torch.h): argument
// checks (before any memory is touched), CopyParams construction and the launch. impl<Backend> registers them.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "common/backend_torch.h"
#include "par_order/par_order.h"

namespace varcore::par_order {

inline int64_t region_side(int64_t G, int64_t M, const char* op) {
  TORCH_CHECK_VALUE(M >= 1, op, ": M (regions per side) must be >= 1, got ", M);
  TORCH_CHECK_VALUE(G >= 1 && G % M == 0, op, ": grid side G=", G, " must be a positive multiple of M=", M);
  return G / M;
}

// Largest unit (8, 4, 2 or 1 bytes) that divides a token's bytes and keeps both pointers aligned.
inline int pick_unit(int64_t token_bytes, const void* a, const void* b) {
  for (int unit : {8, 4, 2}) {
    if (token_bytes % unit == 0 && reinterpret_cast<uintptr_t>(a) % unit == 0 &&
        reinterpret_cast<uintptr_t>(b) % unit == 0) {
      return unit;
    }
  }
  return 1;
}

inline int64_t channels(const at::Tensor& t, int64_t token_dims) {
  return t.dim() == token_dims + 1 ? t.size(-1) : 1;
}

template <class Backend>
void copy_tokens(const at::Tensor& src, at::Tensor& dst, int64_t G, int64_t M, int64_t group_begin,
                 int64_t group_count, int64_t src_batch_stride, int64_t dst_batch_stride, int64_t C, bool to_raster) {
  const int64_t token_bytes = C * int64_t(src.element_size());
  if (src.numel() == 0 || dst.numel() == 0) return;
  CopyParams p;
  p.src = src.data_ptr();
  p.dst = dst.data_ptr();
  p.batch = src.size(0);
  p.G = G;
  p.M = M;
  p.group_begin = group_begin;
  p.group_count = group_count;
  p.src_batch_stride = src_batch_stride;
  p.dst_batch_stride = dst_batch_stride;
  p.unit_bytes = pick_unit(token_bytes, p.src, p.dst);
  p.token_units = token_bytes / p.unit_bytes;
  p.to_raster = to_raster;
  Backend::launch(dst, [&](void* stream) { run_copy<Backend>(p, stream); });
}

// raster (B, G, G[, C]) -> PAR order (B, G*G[, C]); any strides (a contiguous copy is made when needed).
template <class Backend>
at::Tensor par_gather(const at::Tensor& x, int64_t M) {
  TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4, "par_gather: x must be (B, G, G) or (B, G, G, C), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(x.size(1) == x.size(2), "par_gather: x must hold a square G x G grid, got shape ", x.sizes());
  const int64_t G = x.size(1);
  region_side(G, M, "par_gather");
  const at::Tensor src = x.contiguous();
  std::vector<int64_t> shape{x.size(0), G * G};
  if (x.dim() == 4) shape.push_back(x.size(3));
  at::Tensor out = at::empty(shape, x.options());
  copy_tokens<Backend>(src, out, G, M, 0, (G / M) * (G / M), G * G, G * G, channels(x, 3), false);
  return out;
}

// PAR order (B, L[, C]) with L = G*G -> raster (B, G, G[, C]).
template <class Backend>
at::Tensor par_scatter(const at::Tensor& x, int64_t M) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "par_scatter: x must be (B, L) or (B, L, C), got shape ",
                    x.sizes());
  const int64_t L = x.size(1);
  int64_t G = 0;
  while ((G + 1) * (G + 1) <= L) ++G;
  TORCH_CHECK_VALUE(G * G == L && L > 0, "par_scatter: sequence length L=", L, " must be a square G*G");
  region_side(G, M, "par_scatter");
  const at::Tensor src = x.contiguous();
  std::vector<int64_t> shape{x.size(0), G, G};
  if (x.dim() == 3) shape.push_back(x.size(2));
  at::Tensor out = at::empty(shape, x.options());
  copy_tokens<Backend>(src, out, G, M, 0, (G / M) * (G / M), L, L, channels(x, 2), true);
  return out;
}

// Writes the M*M tokens of parallel step `group` (B, M*M[, C]) into a contiguous raster canvas in place.
template <class Backend>
void par_group_scatter_(at::Tensor& canvas, const at::Tensor& tokens, int64_t group, int64_t M) {
  TORCH_CHECK_VALUE(canvas.dim() == 3 || canvas.dim() == 4,
                    "par_group_scatter_: canvas must be (B, G, G) or (B, G, G, C), got shape ", canvas.sizes());
  TORCH_CHECK_VALUE(canvas.size(1) == canvas.size(2), "par_group_scatter_: canvas must be a square grid, got shape ",
                    canvas.sizes());
  TORCH_CHECK_VALUE(canvas.is_contiguous(), "par_group_scatter_: canvas must be contiguous (it is written in place)");
  const int64_t G = canvas.size(1);
  const int64_t R = region_side(G, M, "par_group_scatter_");
  TORCH_CHECK_VALUE(group >= 0 && group < R * R, "par_group_scatter_: group must be in [0, ", R * R, "), got ",
                    group);
  TORCH_CHECK_TYPE(tokens.scalar_type() == canvas.scalar_type(), "par_group_scatter_: tokens dtype ",
                   tokens.scalar_type(), " must match canvas dtype ", canvas.scalar_type());
  TORCH_CHECK_VALUE(tokens.device() == canvas.device(), "par_group_scatter_: tokens on ", tokens.device(),
                    " but canvas on ", canvas.device());
  std::vector<int64_t> want{canvas.size(0), M * M};
  if (canvas.dim() == 4) want.push_back(canvas.size(3));
  TORCH_CHECK_VALUE(tokens.sizes() == at::IntArrayRef(want), "par_group_scatter_: tokens must have shape ",
                    at::IntArrayRef(want), " for this canvas and M, got ", tokens.sizes());
  const at::Tensor src = tokens.contiguous();
  copy_tokens<Backend>(src, canvas, G, M, group, 1, M * M, G * G, channels(canvas, 3), true);
}

// The ops on one backend, for a TORCH_LIBRARY_IMPL block (schemas: par_order_schema.h).
template <class Backend>
void impl(torch::Library& m) {
  m.impl("par_gather", &par_gather<Backend>);
  m.impl("par_scatter", &par_scatter<Backend>);
  m.impl("par_group_scatter_", &par_group_scatter_<Backend>);
}

}  // namespace varcore::par_order
