// PAR token order (spec: code_par_llamagen.md B.2). Plain structs and declarations: no ATen here.
//
// A G x G raster grid is split into M x M regions of side R = G / M. Raster position (r, c) with
// r = a*R + b, c = e*R + d has PAR index n = ((b*R + d)*M + a)*M + e: group g = b*R + d (the same offset in
// every region) is the outer key, region k = a*M + e the inner one, so group g occupies [g*M^2, (g+1)*M^2).
#pragma once

#include <cstdint>

#include "common/backend.h"
#include "common/host_device.h"

namespace varcore::par_order {

// Raster index (r*G + c) of PAR index n.
VC_HD int64_t raster_index(int64_t n, int64_t G, int64_t M) {
  const int64_t R = G / M;
  const int64_t g = n / (M * M), k = n % (M * M);
  const int64_t b = g / R, d = g % R, a = k / M, e = k % M;
  return (a * R + b) * G + e * R + d;
}

// One copy between a PAR-ordered sequence and a raster grid, covering the groups
// [group_begin, group_begin + group_count) (PAR indices group_begin*M^2 onwards) for every batch row. On the
// PAR side, index 0 of a batch row is the first token of group_begin. Tokens are opaque rows of `token_units`
// units of `unit_bytes` bytes (1, 2, 4 or 8), so one kernel serves every dtype and channel count.
struct CopyParams {
  const void* src;
  void* dst;
  int64_t batch;
  int64_t G, M;
  int64_t group_begin, group_count;
  int64_t src_batch_stride, dst_batch_stride;  // in tokens
  int64_t token_units;
  int unit_bytes;
  bool to_raster;  // true: src is PAR-ordered, dst raster (scatter); false: gather
};

// The copy on one backend (common/backend.h): par_order_cpu.cpp defines Cpu's (no stream), par_order_cuda.cu
// Cuda's (nvcc; stream is a cudaStream_t) and Simt's (the host emulation).
template <class Backend>
void run_copy(const CopyParams& p, void* stream);
template <>
void run_copy<Cpu>(const CopyParams& p, void* stream);
template <>
void run_copy<Cuda>(const CopyParams& p, void* stream);
template <>
void run_copy<Simt>(const CopyParams& p, void* stream);

}  // namespace varcore::par_order
