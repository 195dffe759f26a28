// Launchers of the quantiser kernels. Built by nvcc as run_*<Cuda> and, through quant_simt.cpp, as run_*<Simt>
// against the host emulation.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "quant/quant_kernel.cuh"

namespace varcore::quant {

template <>
void run_nearest_code<VC_CUDA_BACKEND>(const NearestParams& p, void* stream) {
  if (p.N == 0) return;
  // Codes per shared-memory tile: as many as fit in 48 KiB next to the rows, a multiple of kLanes, at most 128.
  const int64_t stride = p.C + 1;
  const int64_t fit = (kNearestSmemFloats - kRows * stride) / stride;
  const int tile = int(std::min<int64_t>(128, fit / kLanes * kLanes));
  if (tile < kLanes) {
    throw std::invalid_argument("nearest_code: C=" + std::to_string(p.C) + " exceeds the CUDA kernel's limit of " +
                                std::to_string(kNearestCudaMaxC) + " channels");
  }
  const size_t smem = size_t(kRows + tile) * stride * sizeof(float);
  const auto blocks = unsigned((p.N + kRows - 1) / kRows);
  VC_LAUNCH(nearest_code_kernel, dim3(blocks), dim3(kNearestThreads), smem, static_cast<cudaStream_t>(stream), p,
            tile);
  VC_CHECK_LAUNCH();
}

template <>
void run_upsample_sum<VC_CUDA_BACKEND>(const UpsampleSumParams& p, void* stream) {
  constexpr int kThreads = 256;
  const int64_t total = p.B * p.K * p.C * p.H * p.H;
  if (total == 0) return;
  const int blocks = int(std::min<int64_t>((total + kThreads - 1) / kThreads, 8192));
  VC_LAUNCH(upsample_sum_kernel, dim3(blocks), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), p);
  VC_CHECK_LAUNCH();
}

template <>
void run_area<VC_CUDA_BACKEND>(const AreaParams& p, void* stream) {
  constexpr int kThreads = 256;
  const int64_t total = p.B * p.ph * p.pw * p.C;
  if (total == 0) return;
  const int blocks = int(std::min<int64_t>((total + kThreads - 1) / kThreads, 8192));
  VC_LAUNCH(area_kernel, dim3(blocks), dim3(kThreads), 0, static_cast<cudaStream_t>(stream), p);
  VC_CHECK_LAUNCH();
}

}  // namespace varcore::quant
