// CPU kernels of the quantiser for one instruction set: the nearest-code search and the bicubic upsample-sum.
// quant_cpu.cpp compiles this file once per ISA through common/cpu_isa_variants.h, each copy in its own namespace
// with VC_VEC_BYTES (the SIMD register width) defined; hence no include guard and no includes here.
//
// Nearest code is a GEMM whose epilogue is an argmin. The codes are packed into panels of kNR codes, channel-major
// ([C][kNR] per panel) and multiplied by -2, with +inf norms in the padding so padded codes never win. A micro
// tile keeps the kMR x kNR products in registers over the C loop (one FMA chain per pair, c ascending: the
// order of MKL's sgemm, which the reference's addmm runs), then adds the norms and folds the distances into a
// running (value, index) minimum per row and SIMD lane. Scaling a code by -2 scales every rounded step of the
// chain by -2 exactly, so the chain yields -2 <z, e> of the official order without a multiply (unless products
// are subnormal). Each lane sees its codes in increasing order and replaces its minimum only on a strictly
// smaller value, so the first minimum wins; the lanes are merged at the end with ties going to the smaller index.
// Rows are processed in blocks of kRB that stay in L1 while every panel streams past them (the packed codebook,
// 512 KiB at V=4096, C=32, stays in L2).

typedef float VecF __attribute__((vector_size(VC_VEC_BYTES)));
typedef int32_t VecI __attribute__((vector_size(VC_VEC_BYTES)));
constexpr int kW = VC_VEC_BYTES / 4;  // floats per vector
constexpr int kNV = 2;                // vectors of codes per micro tile
constexpr int kNR = kNV * kW;         // codes per micro tile (= per panel)
constexpr int kMR = VC_VEC_BYTES == 64 ? 12 : VC_VEC_BYTES == 32 ? 6 : 4;  // rows per micro tile
constexpr int64_t kRB = 8 * kMR;      // rows per block (a unit of work for the thread pool)

inline VecF load(const float* p) {
  VecF v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// All lanes set to s: one broadcast, since x - 0 is x for every x (x + 0 is not, for -0.0, and costs an add).
inline VecF broadcast(float s) { return s - VecF{}; }

// Running minimum of one row: per lane, the smallest distance so far and its code.
struct RowMin {
  VecF value;
  VecI index;
};

// Distances of rows z[0..MR) to the kNR codes of one panel, folded into best[0..MR).
template <int MR>
inline void micro_tile(const float* z, int64_t C, const float* z_norm, const float* panel, const float* panel_norm,
                       int32_t first_code, RowMin* best) {
  VecF acc[MR][kNV] = {};
  for (int64_t c = 0; c < C; ++c) {
    VecF e[kNV];
#pragma GCC unroll 4
    for (int j = 0; j < kNV; ++j) e[j] = load(panel + c * kNR + j * kW);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const VecF zi = broadcast(z[i * C + c]);
#pragma GCC unroll 4
      for (int j = 0; j < kNV; ++j) acc[i][j] += zi * e[j];
    }
  }
  VecI lane;
  for (int l = 0; l < kW; ++l) lane[l] = l;
#pragma GCC unroll 4
  for (int j = 0; j < kNV; ++j) {
    const VecF en = load(panel_norm + j * kW);
    const VecI code = lane + (first_code + j * kW);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const VecF d = (z_norm[i] + en) + acc[i][j];  // code_distance, lane-wise (acc holds -2 <z, e>)
      const VecI smaller = d < best[i].value;
      best[i].value = smaller ? d : best[i].value;
      best[i].index = smaller ? code : best[i].index;
    }
  }
}

// The first code with the smallest distance among the lanes of one row.
inline int64_t lane_argmin(const RowMin& m) {
  float value = m.value[0];
  int32_t index = m.index[0];
  for (int l = 1; l < kW; ++l) {
    if (m.value[l] < value || (m.value[l] == value && m.index[l] < index)) {
      value = m.value[l];
      index = m.index[l];
    }
  }
  return index;
}

// Codes (V, C) -> panels of kNR codes times -2, each [C][kNR]; norms padded with +inf.
void pack_codes(const NearestParams& p, float* packed, float* packed_norm) {
  const int64_t panels = (p.V + kNR - 1) / kNR;
  for (int64_t q = 0; q < panels; ++q) {
    for (int64_t k = 0; k < kNR; ++k) {
      const int64_t v = q * kNR + k;
      const bool real = v < p.V;
      packed_norm[q * kNR + k] = real ? p.code_norm[v] : __builtin_inff();
      for (int64_t c = 0; c < p.C; ++c) {
        packed[(q * p.C + c) * kNR + k] = real ? -2.0f * p.codes[v * p.C + c] : 0.0f;
      }
    }
  }
}

// Row block `block` (rows [block * kRB, block * kRB + kRB) within N) against every panel of the packed codebook.
void nearest_block(const NearestParams& p, const float* packed, const float* packed_norm, int64_t block) {
  const int64_t panels = (p.V + kNR - 1) / kNR;
  const int64_t r0 = block * kRB;
  const int64_t rows = p.N - r0 < kRB ? p.N - r0 : kRB;
  const float* z = p.z + r0 * p.C;
  const float* z_norm = p.z_norm + r0;
  RowMin best[kRB];
  for (int64_t i = 0; i < rows; ++i) best[i] = RowMin{broadcast(__builtin_inff()), VecI{}};
  for (int64_t q = 0; q < panels; ++q) {
    const float* panel = packed + q * p.C * kNR;
    const float* panel_norm = packed_norm + q * kNR;
    const auto first_code = int32_t(q * kNR);
    int64_t i = 0;
    for (; i + kMR <= rows; i += kMR) {
      micro_tile<kMR>(z + i * p.C, p.C, z_norm + i, panel, panel_norm, first_code, best + i);
    }
    for (; i < rows; ++i) micro_tile<1>(z + i * p.C, p.C, z_norm + i, panel, panel_norm, first_code, best + i);
  }
  for (int64_t i = 0; i < rows; ++i) p.idx[r0 + i] = lane_argmin(best[i]);
}

// ------------------------------------------------------------------------------------------------ upsample-sum
// Adds the bicubic upsampling of one scale's token map (pn x pn rows of C channels gathered from the table) to
// acc (H, H, C): along x into rows (pn, H, C) first, then along y, with ATen's arithmetic (cubic_sum; its fused
// multiply-adds are instructions here).
inline void add_upsampled_scale(const UpsampleSumParams& p, const int64_t* tokens, int pn, float* rows, float* acc) {
  const int64_t C = p.C, H = p.H;
  if (pn == H) {  // same size: bicubic is the identity (weights 0, 1, 0, 0)
    for (int64_t t = 0; t < H * H; ++t) {
      const float* e = p.table + tokens[t] * C;
      for (int64_t c = 0; c < C; ++c) acc[t * C + c] += e[c];
    }
    return;
  }
  for (int64_t x = 0; x < H; ++x) {
    int index[4];
    float w[4];
    bicubic_taps(int(x), pn, int(H), index, w);
    for (int i = 0; i < pn; ++i) {
      const float* e[4];
      for (int k = 0; k < 4; ++k) e[k] = p.table + tokens[i * pn + index[k]] * C;
      float* r = rows + (i * H + x) * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v[4] = {e[0][c], e[1][c], e[2][c], e[3][c]};
        r[c] = cubic_sum(v, w);
      }
    }
  }
  for (int64_t y = 0; y < H; ++y) {
    int index[4];
    float w[4];
    bicubic_taps(int(y), pn, int(H), index, w);
    const float* r[4];
    for (int k = 0; k < 4; ++k) r[k] = rows + index[k] * H * C;
    float* a = acc + y * H * C;
    for (int64_t xc = 0; xc < H * C; ++xc) {
      const float v[4] = {r[0][xc], r[1][xc], r[2][xc], r[3][xc]};
      a[xc] += cubic_sum(v, w);
    }
  }
}

// Task (b, g) of upsample_sum: the sum of group g's scales for batch row b, written to the output. rows and acc
// are scratch buffers of max(pn) * H * C and H * H * C floats.
void upsample_task(const UpsampleSumParams& p, int64_t task, float* rows, float* acc) {
  const int64_t C = p.C, HH = p.H * p.H;
  const int64_t b = task / p.K, g = task % p.K;
  for (int64_t i = 0; i < HH * C; ++i) acc[i] = 0.0f;
  for (int si = 0; si < p.scales; ++si) {
    if (p.group[si] == g) add_upsampled_scale(p, p.idx + b * p.L + p.offset[si], p.pn[si], rows, acc);
  }
  for (int64_t t = 0; t < HH; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      // memory (B, H, H, K*C) when channels_last, else (B, K*C, H, H)
      const int64_t o = p.channels_last ? ((b * HH + t) * p.K + g) * C + c : ((b * p.K + g) * C + c) * HH + t;
      p.out[o] = acc[t * C + c];
    }
  }
}
