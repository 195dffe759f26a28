// Launcher for the PAR token-order copies. Built by nvcc as run_copy<Cuda> and, through par_order_simt.cpp, as
// run_copy<Simt> against the host emulation.
#include <algorithm>

#include "par_order/par_order_kernel.cuh"

namespace varcore::par_order {
namespace {

template <typename Unit>
void launch(const CopyParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t total = p.batch * p.group_count * p.M * p.M * p.token_units;
  if (total == 0) return;
  // Enough blocks to fill a large GPU; the grid-stride loop covers the rest.
  const int blocks = int(std::min<int64_t>((total + kThreads - 1) / kThreads, 4096));
  auto kernel = copy_kernel<Unit>;
  VC_LAUNCH(kernel, dim3(blocks), dim3(kThreads), 0, stream, p);
  VC_CHECK_LAUNCH();
}

}  // namespace

template <>
void run_copy<VC_CUDA_BACKEND>(const CopyParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.unit_bytes) {
    case 1: launch<uint8_t>(p, s); break;
    case 2: launch<uint16_t>(p, s); break;
    case 4: launch<uint32_t>(p, s); break;
    default: launch<uint64_t>(p, s); break;
  }
}

}  // namespace varcore::par_order
