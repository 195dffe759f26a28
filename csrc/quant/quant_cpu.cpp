// CPU kernels of the quantiser: the code of quant_cpu_impl.h compiled for AVX-512, AVX2+FMA and the baseline
// x86-64 (or the host's default elsewhere), picked at run time by what the CPU supports and capped by
// VARCORE_CPU_ISA (common/cpu_isa.h), as for the attention kernels.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "common/cpu_isa.h"
#include "quant/quant.h"

namespace varcore::quant {

#define VC_ISA_IMPL "quant/quant_cpu_impl.h"
#include "common/cpu_isa_variants.h"

namespace {

// The kernels of one ISA variant.
struct IsaKernels {
  int panel_codes;
  int64_t block_rows;
  void (*pack)(const NearestParams&, float*, float*);
  void (*block)(const NearestParams&, const float*, const float*, int64_t);
  void (*upsample)(const UpsampleSumParams&, int64_t, float*, float*);
};

IsaKernels pick_isa_kernels() {
  IsaKernels k{};
  VC_WITH_ISA(cpu::pick_isa(), k = IsaKernels{isa_ns::kNR, isa_ns::kRB, isa_ns::pack_codes, isa_ns::nearest_block,
                                               isa_ns::upsample_task});
  return k;
}

}  // namespace

template <>
void run_upsample_sum<Cpu>(const UpsampleSumParams& p, void*) {
  const IsaKernels k = pick_isa_kernels();
  int max_pn = 0;
  for (int si = 0; si < p.scales; ++si) max_pn = std::max(max_pn, p.pn[si]);
  // One task per (batch row, phi group): each writes its own part of the output. A task is ~10 flops per output
  // element of each of its scales; below ~2^18 elements per thread a wake-up costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (p.H * p.H * p.C));
  at::parallel_for(0, p.B * p.K, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(max_pn * p.H * p.C), acc(p.H * p.H * p.C);
    for (int64_t task = begin; task < end; ++task) k.upsample(p, task, rows.data(), acc.data());
  });
}

template <>
void run_area<Cpu>(const AreaParams& p, void*) {
  // Each output row reads (H / ph) input rows of every channel: split only maps of more than ~2^18 inputs.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (p.C * p.W * std::max<int64_t>(1, p.H / p.ph)));
  at::parallel_for(0, p.B * p.ph, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.ph, oy = task % p.ph;
      const int64_t y0 = area_begin(oy, p.ph, p.H), y1 = area_end(oy, p.ph, p.H);
      for (int64_t ox = 0; ox < p.pw; ++ox) {
        const int64_t x0 = area_begin(ox, p.pw, p.W), x1 = area_end(ox, p.pw, p.W);
        float* out = p.out + b * p.sb + oy * p.sy + ox * p.sx;
        for (int64_t c = 0; c < p.C; ++c) {
          out[c * p.sc] = area_average(p.src + (b * p.C + c) * p.H * p.W, p.W, y0, y1, x0, x1);
        }
      }
    }
  });
}

template <>
void run_nearest_code<Cpu>(const NearestParams& p, void*) {
  if (p.N == 0) return;
  const IsaKernels k = pick_isa_kernels();
  const int64_t panels = (p.V + k.panel_codes - 1) / k.panel_codes;
  std::vector<float> packed(panels * p.C * k.panel_codes), packed_norm(panels * k.panel_codes);
  k.pack(p, packed.data(), packed_norm.data());
  // Threads take row blocks from a shared counter rather than fixed halves, so a thread slowed down by other load
  // on the machine does not hold the others up.
  const int64_t blocks = (p.N + k.block_rows - 1) / k.block_rows;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(blocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t b = next++; b < blocks; b = next++) k.block(p, packed.data(), packed_norm.data(), b);
  });
}

}  // namespace varcore::quant
