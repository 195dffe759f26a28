// CPU kernel for the PAR token-order copies: one typed copy per token, parallel over (batch, token).
#include <ATen/Parallel.h>

#include <cstring>

#include "par/par.h"

namespace varcore::par {
namespace {

template <typename Unit>
void copy_rows(const CopyParams& p) {
  const auto* src = static_cast<const Unit*>(p.src);
  auto* dst = static_cast<Unit*>(p.dst);
  const int64_t U = p.token_units;
  const int64_t total = p.batch * p.count;
  // Grain of at least ~32 KiB of payload per task keeps tiny grids single-threaded.
  const int64_t grain = std::max<int64_t>(1, (32768 / int64_t(sizeof(Unit))) / std::max<int64_t>(U, 1));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bi = i / p.count, k = i % p.count;
      const int64_t r = raster_index(p.n_offset + k, p.G, p.M);
      const int64_t s = p.to_raster ? k : r, d = p.to_raster ? r : k;
      const Unit* from = src + (bi * p.src_batch_stride + s) * U;
      Unit* to = dst + (bi * p.dst_batch_stride + d) * U;
      if (U == 1) {
        *to = *from;
      } else {
        std::memcpy(to, from, size_t(U) * sizeof(Unit));
      }
    }
  });
}

}  // namespace

void copy_cpu(const CopyParams& p) {
  switch (p.unit_bytes) {
    case 1: copy_rows<uint8_t>(p); break;
    case 2: copy_rows<uint16_t>(p); break;
    case 4: copy_rows<uint32_t>(p); break;
    default: copy_rows<uint64_t>(p); break;
  }
}

}  // namespace varcore::par
