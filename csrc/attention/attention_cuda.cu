// Launchers of the block-causal attention kernels. Built by nvcc as run_*<Cuda> and, through attention_simt.cpp,
// as run_*<Simt> against the host emulation.
#include <stdexcept>
#include <string>
#include <utility>

#include "attention/attention_kernel.cuh"

namespace varcore::attention {
namespace {

constexpr std::size_t kDefaultSmem = 48 * 1024;  // usable without cudaFuncSetAttribute

int padded_dim16(int64_t D) { return static_cast<int>((D + 15) / 16 * 16); }

std::size_t elem_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// The largest tiles whose shared memory fits the limit; Smem is ForwardSmem or BackwardSmem.
template <class Smem>
Tiles pick_tiles(int64_t D, DType dtype, std::size_t limit, const char* op) {
  const int dp = padded_dim16(D);
  for (auto [bq, bk] : {std::pair{64, 64}, std::pair{32, 64}, std::pair{64, 32}, std::pair{32, 32},
                        std::pair{16, 32}, std::pair{16, 16}}) {
    const Tiles t{bq, bk, dp};
    if (Smem(t, elem_bytes(dtype)).total <= limit) return t;
  }
  throw std::runtime_error(std::string(op) + ": head dim " + std::to_string(D) + " needs more shared memory than " +
                           std::to_string(limit) + " bytes");
}

template <class Kernel>
void allow_smem(Kernel kernel, std::size_t bytes) {
  if (bytes > kDefaultSmem) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    VC_CHECK_LAUNCH();
  }
}

template <class T>
void launch_forward(const ForwardParams& p, cudaStream_t stream) {
  const Tiles t = pick_tiles<ForwardSmem>(p.D, p.dtype, p.smem_limit, "block_causal_attention");
  const std::size_t smem = ForwardSmem(t, sizeof(T)).total;
  auto kernel = forward_kernel<T>;
  allow_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>((p.Lq + t.bq - 1) / t.bq), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(p.B));
  VC_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p, t);
  VC_CHECK_LAUNCH();
}

template <class T>
void launch_backward(const BackwardParams& p, cudaStream_t stream) {
  const Tiles t = pick_tiles<BackwardSmem>(p.D, p.dtype, p.smem_limit, "block_causal_attention_backward");
  const std::size_t smem = BackwardSmem(t, sizeof(T)).total;
  auto kernel = backward_kernel<T>;
  allow_smem(kernel, smem);
  const dim3 grid(static_cast<unsigned>((p.Lk + t.bk - 1) / t.bk), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(p.B));
  VC_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, p, t);
  VC_CHECK_LAUNCH();
}

template <class Params, class Fn>
void dispatch(const Params& p, const char* op, Fn&& fn) {
  switch (p.dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(__half{}); break;
    case DType::kBFloat16: fn(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string(op) + ": the CUDA kernel supports float32, float16, bfloat16");
  }
}

}  // namespace

template <>
void run_forward<VC_CUDA_BACKEND>(const ForwardParams& p, void* stream) {
  dispatch(p, "block_causal_attention", [&](auto tag) {
    launch_forward<decltype(tag)>(p, static_cast<cudaStream_t>(stream));
  });
}

template <>
void run_backward<VC_CUDA_BACKEND>(const BackwardParams& p, void* stream) {
  dispatch(p, "block_causal_attention_backward", [&](auto tag) {
    launch_backward<decltype(tag)>(p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace varcore::attention
