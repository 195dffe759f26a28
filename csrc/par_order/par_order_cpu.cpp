// CPU kernel for the PAR token-order copies: parallel over (batch row, group); inside a group the M x M
// region loop needs no integer division.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "par_order/par_order.h"

namespace varcore::par_order {
namespace {

template <typename Unit>
void copy_groups(const CopyParams& p) {
  const auto* src = static_cast<const Unit*>(p.src);
  auto* dst = static_cast<Unit*>(p.dst);
  const int64_t U = p.token_units, G = p.G, M = p.M, R = G / M;
  const int64_t items = p.batch * p.group_count;
  // Below ~256 KiB per task the thread pool costs more than it saves.
  const int64_t bytes_per_item = M * M * U * int64_t(sizeof(Unit));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / bytes_per_item);
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bi = item / p.group_count, gi = item % p.group_count;
      const int64_t g = p.group_begin + gi;
      const int64_t b = g / R, d = g % R;
      const Unit* src_row = src + bi * p.src_batch_stride * U;
      Unit* dst_row = dst + bi * p.dst_batch_stride * U;
      int64_t seq = gi * M * M;  // PAR-side index of (a, e) = (0, 0)
      for (int64_t a = 0; a < M; ++a) {
        for (int64_t e = 0; e < M; ++e, ++seq) {
          const int64_t ras = (a * R + b) * G + e * R + d;
          const int64_t s = p.to_raster ? seq : ras, t = p.to_raster ? ras : seq;
          if (U == 1) {
            dst_row[t] = src_row[s];
          } else {
            std::memcpy(dst_row + t * U, src_row + s * U, size_t(U) * sizeof(Unit));
          }
        }
      }
    }
  });
}

}  // namespace

template <>
void run_copy<Cpu>(const CopyParams& p, void*) {
  switch (p.unit_bytes) {
    case 1: copy_groups<uint8_t>(p); break;
    case 2: copy_groups<uint16_t>(p); break;
    case 4: copy_groups<uint32_t>(p); break;
    default: copy_groups<uint64_t>(p); break;
  }
}

}  // namespace varcore::par_order
