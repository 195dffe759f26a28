// The block-causal attention CUDA kernels compiled as C++ against the host emulation, exposed as varcore_simt ops
// for tests. The shared memory limit per block is VARCORE_SIMT_SMEM_KB (default 64, what an sm_75 block may opt
// in to), so tests can run both the small tiles and the large ones of GPUs with more shared memory.
#ifndef VARCORE_SIMT
#define VARCORE_SIMT 1
#endif
#include "attention/attention_cuda.cu"
#include "attention/attention_glue.h"

#include <torch/library.h>

#include <cstdlib>

namespace varcore::attention {
namespace {

Backend emulated_backend() {
  const char* env = std::getenv("VARCORE_SIMT_SMEM_KB");
  const std::size_t kb = env && *env ? std::strtoul(env, nullptr, 10) : 64;
  return Backend{false, true, kb * 1024};
}

std::tuple<at::Tensor, at::Tensor> forward_emulated(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& visible_end, double scale,
                                                    c10::string_view layout) {
  return forward(q, k, v, visible_end, scale, layout, emulated_backend(),
                 [](const ForwardParams& p) { forward_simt(p, nullptr); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_emulated(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& visible_end, double scale, c10::string_view layout,
    const std::optional<at::Tensor>& grad_lse) {
  return backward(grad_out, q, k, v, out, lse, visible_end, scale, layout, grad_lse, emulated_backend(),
                  [](const BackwardParams& p) { backward_simt(p, nullptr); });
}

}  // namespace
}  // namespace varcore::attention

TORCH_LIBRARY_FRAGMENT(varcore_simt, m) {
  m.def("block_causal_attention(Tensor q, Tensor k, Tensor v, Tensor visible_end, float scale, str layout=\"bhld\")"
        " -> (Tensor out, Tensor lse)");
  m.def("block_causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor visible_end, float scale, str layout=\"bhld\", Tensor? grad_lse=None)"
        " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(varcore_simt, CPU, m) {
  m.impl("block_causal_attention", &varcore::attention::forward_emulated);
  m.impl("block_causal_attention_backward", &varcore::attention::backward_emulated);
}
