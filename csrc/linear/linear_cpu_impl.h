// Few-row linear layer for one instruction set. linear_cpu.cpp compiles this file once per ISA, each copy in its
// own namespace with VC_VEC_BYTES (the SIMD register width in bytes) defined; hence no include guard.
//
// Why: a decoding step multiplies 2-64 rows by every weight matrix once, so the weights stream from memory once
// per step and the products are too short for a general GEMM's packing of the activations to pay off (MKL and
// oneDNN reach about half of this CPU's single-core peak at 32 rows). Here the weight is pre-packed into
// contiguous column panels (linear.h); K is cut into chunks that stay in L1 while every block of rows uses them,
// and each micro tile prefetches a share of the next panel so the memory stream overlaps the FMAs.
// The micro tile keeps kMR x kNR float accumulators in registers (24 of AVX-512's 32) and adds one broadcast
// activation times kNR / W weight vectors per step of K.

constexpr int kNR = (VC_VEC_BYTES == 64 ? 4 : 2) * VC_VEC_BYTES / 4;  // columns of a micro tile
constexpr int kMR = VC_VEC_BYTES == 16 ? 4 : 6;                      // rows of a micro tile
static_assert(kPanel % kNR == 0, "a panel must be a whole number of micro tiles");

using VecF = float __attribute__((vector_size(VC_VEC_BYTES)));
constexpr int kW = VC_VEC_BYTES / 4;

inline VecF load_vec(const float* p) {
  VecF v;
  __builtin_memcpy(&v, p, sizeof(VecF));
  return v;
}

// Prefetch of the next panel's cache lines (into L2) while this panel's FMAs run; the schedule is micro_tile's
// kSpread. kSpread = false (few rows: a panel has fewer steps of K than lines): `lines` lines per step from `pf`,
// advanced by the caller (`acc` unused). kSpread = true: one line whenever the counter `acc` passes 1024 after
// adding `lines` (lines per 1024 steps), so the lines are spread evenly over the whole panel; issuing them faster,
// early in the panel, stalls the FMAs on full fill buffers (~10% slower at 32 rows on this project's CPU).
struct Prefetch {
  const char* pf;
  int lines;
  int acc;
};

// c[MR x kNR] (= or +=) a[MR x K] (row stride lda) * b[K x kNR] (row stride kPanel); each step of K also prefetches
// its share of the next panel (Prefetch).
template <int MR, bool kSpread>
inline void micro_tile(int64_t K, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, bool add,
                       Prefetch& next) {
  const char* pf = next.pf;
  const int lines = next.lines;
  int acc = next.acc;
  constexpr int NV = kNR / kW;
  VecF r[MR][NV] = {};
  if (add) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) r[i][j] = load_vec(c + i * ldc + j * kW);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    if (pf) {
      if constexpr (kSpread) {
        acc += lines;
        if (acc >= 1024) {
          acc -= 1024;
          __builtin_prefetch(pf, 0, 2);
          pf += 64;
        }
      } else {
        for (int l = 0; l < lines; ++l) __builtin_prefetch(pf + (k * lines + l) * 64, 0, 2);
      }
    }
    VecF bv[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) bv[j] = load_vec(b + k * kPanel + j * kW);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const float s = a[i * lda + k];
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) r[i][j] += s * bv[j];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) __builtin_memcpy(c + i * ldc + j * kW, &r[i][j], sizeof(VecF));
  }
  if constexpr (kSpread) {
    next.pf = pf;
    next.acc = acc;
  }
}

template <int MR, bool kSpread>
inline void micro_rows(int64_t rows, int64_t K, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                       bool add, Prefetch& next) {
  if constexpr (MR > 1) {
    if (rows < MR) return micro_rows<MR - 1, kSpread>(rows, K, a, lda, b, c, ldc, add, next);
  }
  micro_tile<MR, kSpread>(K, a, lda, b, c, ldc, add, next);
}

// Steps of K per pass over the row blocks: kKC rows of a panel (kKC * kPanel * 4 = 32 KiB) stay in L1 while
// every block of rows uses them.
constexpr int64_t kKC = 128;

template <bool kSpread>
inline void panels_with(const float* x, int64_t R, int64_t K, const float* packed, int64_t p0, int64_t p1,
                        int64_t n_panels, float* y, int64_t ldy, int64_t blocks, int64_t steps,
                        int64_t panel_lines) {
  constexpr int64_t tiles = kPanel / kNR;
  const int lines = kSpread ? int((panel_lines * 1024 + steps - 1) / steps) : int((panel_lines + steps - 1) / steps);
  for (int64_t p = p0; p < p1; ++p) {
    const float* w = packed + p * K * kPanel;
    const char* next_panel = p + 1 < n_panels ? reinterpret_cast<const char*>(w + K * kPanel) : nullptr;
    Prefetch next{next_panel, lines, 0};
    int64_t done = 0;  // steps of K taken in this panel (the few-rows prefetch position)
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min<int64_t>(kKC, K - k0);
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t r0 = blk * R / blocks, r1 = (blk + 1) * R / blocks;
        for (int64_t t = 0; t < tiles; ++t, done += kc) {
          if constexpr (!kSpread) {
            next.pf = next_panel && done * lines < panel_lines ? next_panel + done * lines * 64 : nullptr;
          }
          micro_rows<kMR, kSpread>(r1 - r0, kc, x + r0 * K + k0, K, w + k0 * kPanel + t * kNR,
                                   y + r0 * ldy + p * kPanel + t * kNR, ldy, k0 > 0, next);
        }
      }
    }
  }
}

// Panels [p0, p1) of y = x W^T.
inline void panels(const float* x, int64_t R, int64_t K, const float* packed, int64_t p0, int64_t p1,
                   int64_t n_panels, float* y, int64_t ldy) {
  const int64_t blocks = (R + kMR - 1) / kMR;  // row blocks of near-equal size (<= kMR rows each)
  const int64_t steps = blocks * (kPanel / kNR) * K, panel_lines = K * kPanel * 4 / 64;  // steps of K per panel
  if (steps >= panel_lines) {
    panels_with<true>(x, R, K, packed, p0, p1, n_panels, y, ldy, blocks, steps, panel_lines);
  } else {
    panels_with<false>(x, R, K, packed, p0, p1, n_panels, y, ldy, blocks, steps, panel_lines);
  }
}
