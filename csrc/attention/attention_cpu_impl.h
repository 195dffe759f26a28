// CPU block-causal attention for one instruction set. attention_cpu.cpp compiles this file once per ISA through
// common/cpu_isa_variants.h, each copy in its own namespace with VC_VEC_BYTES (the SIMD register width) defined;
// hence no include guard and no includes.
//
// Algorithm (FlashAttention-2): a query tile of kBQ rows walks the key tiles of kBK keys that any of its rows can
// see, keeping a running row max m and row sum l of exp2(score - m) and rescaling its output accumulator when m
// grows; key tiles past the tile's largest visible_end are never touched, rows that do not see a key tile skip
// its products, and no score matrix larger than kMRf x kBK exists. Scores are taken in base 2 (q pre-multiplied
// by scale * log2 e). Keys and values are packed once per task (a head, or part of one when heads are few). The
// forward works on blocks of kMRf query rows against one key tile at a time: scores into a small buffer, the
// softmax step on it, then O = alpha * O + P V in one micro-kernel pass, so the key and value tiles stay in L1
// while every row block of the query tile uses them; only a tile holding a row's visible_end is masked. The
// backward recomputes the probabilities from the saved log-sum-exp, one (batch, head) per task so dq accumulates
// without races.
//
// All products are C (+)= A * B on float (double for float64) buffers with row strides; head dims are padded
// with zeros to a multiple of kNR so the micro kernel needs no column tail.

constexpr int64_t kBQ = 64;  // query rows per tile
constexpr int64_t kBK = 64;  // keys per tile
// GEMM micro tile: kMRf rows x kNR columns of float accumulators, kept in registers (24 of AVX-512's 32, 12 of
// AVX2's 16, 8 of SSE's 16), leaving room for the B row and the broadcast A element.
constexpr int kMRf = VC_VEC_BYTES == 16 ? 4 : 6;
constexpr int kNR = (VC_VEC_BYTES == 64 ? 4 : 2) * VC_VEC_BYTES / 4;
static_assert(kBK % kNR == 0, "a key tile must be a whole number of micro tile columns");

template <class A, int N>
struct VecN {
  typedef A type __attribute__((vector_size(N * sizeof(A))));
};
template <class A>
struct VecOf {
  static constexpr int W = VC_VEC_BYTES / sizeof(A);  // lanes of one SIMD register
  using type = typename VecN<A, W>::type;
};
using FloatBits = VecN<int32_t, VC_VEC_BYTES / 4>::type;

// Rows of a micro tile: float64 vectors hold half as many lanes, so half the rows keep the same register count.
template <class A>
constexpr int kMR = std::is_same_v<A, double> ? kMRf / 2 : kMRf;

// Unaligned vector load and store (memcpy compiles to one move).
template <class V, class A>
inline V vload(const A* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <class V, class A>
inline void vstore(A* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

inline int64_t padded_dim(int64_t D) { return (D + kNR - 1) / kNR * kNR; }

// ------------------------------------------------------------------------------------------------ GEMM
// How a micro tile starts its accumulators: from zero, from C, or from C with row i scaled by row_scale[i].
enum class Init { kZero, kLoad, kLoadScaled };

// C[MR x kNR] (=, +=, or scale-and-add) A[MR x K] * B[K x kNR], the accumulators kept in registers across K.
template <int MR, class A>
inline void micro_tile(int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb, A* c, int64_t ldc, Init init,
                       const A* row_scale) {
  using V = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  constexpr int NV = kNR / W;
  V r[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    const A f = init == Init::kLoadScaled ? row_scale[i] : A(1);
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) r[i][j] = init == Init::kZero ? V{} : vload<V>(c + i * ldc + j * W) * f;
  }
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) bv[j] = vload<V>(b + k * ldb + j * W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const A s = a[i * lda + k];
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) r[i][j] += s * bv[j];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) vstore(c + i * ldc + j * W, r[i][j]);
  }
}

// micro_tile for any row count 1 <= rows <= MR (the tail of a row range).
template <int MR, class A>
inline void micro_rows(int64_t rows, int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb, A* c, int64_t ldc,
                       Init init, const A* row_scale = nullptr) {
  if constexpr (MR > 1) {
    if (rows < MR) return micro_rows<MR - 1>(rows, K, a, lda, b, ldb, c, ldc, init, row_scale);
  }
  micro_tile<MR>(K, a, lda, b, ldb, c, ldc, init, row_scale);
}

// C[M x N] (+)= A[M x K] * B[K x N]; N a multiple of kNR, any M and K.
template <class A>
void gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb, A* c, int64_t ldc,
          bool accumulate) {
  const Init init = accumulate ? Init::kLoad : Init::kZero;
  for (int64_t j = 0; j < N; j += kNR) {
    for (int64_t i = 0; i < M; i += kMR<A>) {
      micro_rows<kMR<A>>(std::min<int64_t>(kMR<A>, M - i), K, a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc,
                         init);
    }
  }
}

// ------------------------------------------------------------------------------------------------ row math
// 2^x for a whole vector: round x to n + f with |f| <= 1/2, a degree-6 polynomial for 2^f (relative error about
// 1.2e-7) times 2^n built in the exponent bits. Inputs below -126 (masked scores are -inf) give exactly 0.
inline typename VecOf<float>::type exp2_vec(typename VecOf<float>::type x) {
  using V = VecOf<float>::type;
  using I = FloatBits;
  const V lo = V{} - 126.0f;
  const I flush = x < lo;
  x = flush ? lo : x;
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  const V t = x + magic;
  const V f = x - (t - magic);
  const I n = reinterpret_cast<const I&>(t) - reinterpret_cast<const I&>(magic);
  V p = V{} + 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const I scale_bits = (n + 127) << 23;
  const V r = p * reinterpret_cast<const V&>(scale_bits);
  return flush ? V{} : r;
}
inline typename VecOf<double>::type exp2_vec(typename VecOf<double>::type x) {
  for (int j = 0; j < VecOf<double>::W; ++j) x[j] = std::exp2(x[j]);
  return x;
}

// row[j] = 2^(row[j] * mul - sub) for j < n (n a multiple of the vector width); -inf entries become 0.
template <class A>
inline void exp2_row(A* row, int64_t n, A mul, A sub) {
  using V = typename VecOf<A>::type;
  for (int64_t j = 0; j < n; j += VecOf<A>::W) vstore(row + j, exp2_vec(vload<V>(row + j) * mul - sub));
}

// Horizontal max and sum of an N-lane vector, halving it each step.
template <class A, int N>
inline A hmax(typename VecN<A, N>::type v) {
  if constexpr (N == 2) {
    return std::max(v[0], v[1]);
  } else {
    using H = typename VecN<A, N / 2>::type;
    H lo, hi;
    __builtin_memcpy(&lo, &v, sizeof(H));
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return hmax<A, N / 2>(lo > hi ? lo : hi);
  }
}
template <class A, int N>
inline A hsum(typename VecN<A, N>::type v) {
  if constexpr (N == 2) {
    return v[0] + v[1];
  } else {
    using H = typename VecN<A, N / 2>::type;
    H lo, hi;
    __builtin_memcpy(&lo, &v, sizeof(H));
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return hsum<A, N / 2>(lo + hi);
  }
}

template <class A>
inline void mask_from(A* row, int64_t visible, int64_t n) {
  for (int64_t j = std::max<int64_t>(visible, 0); j < n; ++j) row[j] = -std::numeric_limits<A>::infinity();
}

// ------------------------------------------------------------------------------------------------ packing
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
inline const T* head_ptr(const View& v, int64_t b, int64_t h) {
  return static_cast<const T*>(v.data) + b * v.sb + h * v.sh;
}

// dst[i][0:Dp] = mul * src row i for i < rows, zero-padded in d; rows [rows, total) all zero.
template <class T, class A>
void pack_rows(A* dst, int64_t total, int64_t Dp, const T* src, int64_t sl, int64_t rows, int64_t D, A mul) {
  for (int64_t i = 0; i < total; ++i) {
    A* d = dst + i * Dp;
    int64_t c = 0;
    if (i < rows) {
      const T* s = src + i * sl;
      for (; c < D; ++c) d[c] = static_cast<A>(s[c]) * mul;
    }
    for (; c < Dp; ++c) d[c] = 0;
  }
}

// dst[d][i] = src row i, column d: a [Dp x kBK] panel, zero where i >= rows or d >= D.
template <class T, class A>
void pack_transposed(A* dst, int64_t Dp, const T* src, int64_t sl, int64_t rows, int64_t D) {
  std::fill(dst, dst + Dp * kBK, A(0));
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * sl;
    for (int64_t d = 0; d < D; ++d) dst[d * kBK + i] = static_cast<A>(s[d]);
  }
}

// dst[j][i] = src[i][j] for i < rows, j < cols (dst row stride kBQ).
template <class A>
void transpose_tile(A* dst, const A* src, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * kBQ + i] = src[i * kBK + j];
  }
}

// Rows [lo, hi) of a tile hold every row that sees key k0 (ends[i] > k0); hi == lo when none does. Rows outside
// need no products with this key tile (VAR's scales and PAR's groups make them a prefix of the tile).
struct RowRange {
  int64_t lo, hi;
};
inline RowRange rows_seeing(const int64_t* ends, int64_t rows, int64_t k0) {
  int64_t lo = 0, hi = rows;
  while (lo < rows && ends[lo] <= k0) ++lo;
  while (hi > lo && ends[hi - 1] <= k0) --hi;
  return RowRange{lo, hi};
}

// ------------------------------------------------------------------------------------------------ forward
template <class A>
struct ForwardWorkspace {
  static constexpr int W = VecOf<A>::W;
  std::vector<A> kt, v;  // the head's keys as [Dp x kBK] panels, one per key tile, and values as [Lk x Dp] rows
  std::vector<A> q, o, m, l;  // one query tile; l holds a vector of partial row sums per row (summed at the end)
  std::vector<A> s, alpha;    // one row block: scores then probabilities, and the rescale factor of each row
  ForwardWorkspace(int64_t Lk, int64_t Dp)
      : kt((Lk + kBK - 1) / kBK * kBK * Dp), v((Lk + kBK - 1) / kBK * kBK * Dp), q(kBQ * Dp), o(kBQ * Dp), m(kBQ),
        l(kBQ * W), s(kMR<A> * kBK), alpha(kMR<A>) {}
};

// Packs the key tiles of head (b, h) that cover keys [0, key_end), once for all the query tiles of a task.
template <class T>
void pack_keys(const ForwardParams& p, int64_t b, int64_t h, int64_t key_end, ForwardWorkspace<acc_t<T>>& w) {
  const int64_t D = p.D, Dp = padded_dim(D);
  const T* k = head_ptr<T>(p.k, b, h);
  const T* v = head_ptr<T>(p.v, b, h);
  for (int64_t k0 = 0; k0 < key_end; k0 += kBK) {
    const int64_t kn = std::min(kBK, p.Lk - k0);
    pack_transposed(w.kt.data() + k0 * Dp, Dp, k + k0 * p.k.sl, p.k.sl, kn, D);
    pack_rows(w.v.data() + k0 * Dp, kBK, Dp, v + k0 * p.v.sl, p.v.sl, kn, D, acc_t<T>(1));
  }
}

// One online-softmax step for a block of `rows` query rows against one key tile. s holds their base-2 scores
// ([rows x kBK]), of which the first visible[i] count in row i. On return s holds the unnormalised probabilities
// (0 where masked), m the new row maxima, l the row sums (vectors of partial sums) rescaled to them, and alpha the
// factor by which each row's output accumulator must be rescaled (1 for a row that sees none of the tile).
template <class A>
void softmax_block(A* s, int64_t rows, const int64_t* visible, A* m, A* l, A* alpha) {
  using V = typename VecOf<A>::type;
  constexpr int W = VecOf<A>::W;
  constexpr int NB = kBK / W;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  static_assert(kMR<A> <= W, "one lane per row of a block");
  V lane{};
  for (int j = 0; j < W; ++j) lane[j] = A(j);
  V shift{};  // m_old - m_new per row, one lane each (kMR <= W)
  for (int64_t i = 0; i < rows; ++i) {
    A* row = s + i * kBK;
    const int64_t vis = visible[i];
    if (vis <= 0) continue;  // m stays, shift 0: alpha 1
    V x[NB];
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) x[b] = vload<V>(row + b * W);
    if (vis < kBK) {  // only a tile holding a row's visible_end needs the mask
#pragma GCC unroll 16
      for (int b = 0; b < NB; ++b) {
        x[b] = lane < A(vis - b * W) ? x[b] : V{} + kNegInf;
        vstore(row + b * W, x[b]);
      }
    }
    V mx = x[0];
#pragma GCC unroll 16
    for (int b = 1; b < NB; ++b) mx = x[b] > mx ? x[b] : mx;
    const A m_new = std::max(m[i], hmax<A, W>(mx));
    shift[i] = m[i] - m_new;  // -inf on the row's first visible tile: alpha 0
    m[i] = m_new;
  }
  const V a = exp2_vec(shift);
  for (int64_t i = 0; i < rows; ++i) {
    A* row = s + i * kBK;
    alpha[i] = a[i];
    if (visible[i] <= 0) {
      std::fill(row, row + kBK, A(0));
      continue;
    }
    V sum{};
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      const V p = exp2_vec(vload<V>(row + b * W) - m[i]);
      vstore(row + b * W, p);
      sum += p;
    }
    vstore(l + i * W, vload<V>(l + i * W) * a[i] + sum);
  }
}

// Output rows q0 .. q0 + kBQ of head (b, h).
template <class T>
void forward_tile(const ForwardParams& p, int64_t b, int64_t h, int64_t q0, ForwardWorkspace<acc_t<T>>& w) {
  using A = acc_t<T>;
  constexpr int W = VecOf<A>::W;
  constexpr int MR = kMR<A>;
  const int64_t D = p.D, Dp = padded_dim(D);
  const int64_t rows = std::min(kBQ, p.Lq - q0);
  int64_t ends[kBQ], visible[kBQ];
  int64_t tile_end = 0;
  for (int64_t i = 0; i < rows; ++i) tile_end = std::max(tile_end, ends[i] = p.visible_end[q0 + i]);

  const A log2e = A(1.4426950408889634);
  pack_rows(w.q.data(), rows, Dp, head_ptr<T>(p.q, b, h) + q0 * p.q.sl, p.q.sl, rows, D, A(p.scale) * log2e);
  std::fill(w.o.begin(), w.o.begin() + rows * Dp, A(0));
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<A>::infinity());
  std::fill(w.l.begin(), w.l.end(), A(0));

  A* s = w.s.data();
  for (int64_t k0 = 0; k0 < tile_end; k0 += kBK) {
    const int64_t kn = std::min(kBK, p.Lk - k0);
    const A* kt = w.kt.data() + k0 * Dp;
    const A* v = w.v.data() + k0 * Dp;
    const auto [lo, hi] = rows_seeing(ends, rows, k0);
    for (int64_t i = lo; i < hi; ++i) visible[i] = ends[i] - k0;
    for (int64_t r0 = lo; r0 < hi; r0 += MR) {
      const int64_t nr = std::min<int64_t>(MR, hi - r0);
      for (int64_t j = 0; j < kBK; j += kNR) {  // S = Q K^T for the block
        micro_rows<MR>(nr, Dp, w.q.data() + r0 * Dp, Dp, kt + j, kBK, s + j, kBK, Init::kZero);
      }
      softmax_block(s, nr, visible + r0, w.m.data() + r0, w.l.data() + r0 * W, w.alpha.data());
      for (int64_t j = 0; j < Dp; j += kNR) {  // O = alpha O + P V
        micro_rows<MR>(nr, kn, s, kBK, v + j, Dp, w.o.data() + r0 * Dp + j, Dp, Init::kLoadScaled, w.alpha.data());
      }
    }
  }

  T* out = static_cast<T*>(p.out.data) + b * p.out.sb + h * p.out.sh + q0 * p.out.sl;
  A* lse = static_cast<A*>(p.lse) + (b * p.H + h) * p.Lq + q0;
  const A ln2 = A(0.6931471805599453);
  for (int64_t i = 0; i < rows; ++i) {
    const A l = hsum<A, W>(vload<typename VecOf<A>::type>(w.l.data() + i * W));
    const A inv = l > 0 ? A(1) / l : A(0);
    const A* o = w.o.data() + i * Dp;
    for (int64_t d = 0; d < D; ++d) out[i * p.out.sl + d] = static_cast<T>(o[d] * inv);
    lse[i] = l > 0 ? (w.m[i] + std::log2(l)) * ln2 : -std::numeric_limits<A>::infinity();
  }
}

// ------------------------------------------------------------------------------------------------ backward
template <class A>
struct BackwardWorkspace {
  std::vector<A> q, dout, dq, lse2, delta;  // whole head
  std::vector<A> k, kt, vt, dk, dv, s, dp, t;  // one key tile / one (query, key) tile pair
  std::vector<int64_t> ends, tile_end;
  BackwardWorkspace(int64_t Lq, int64_t Dp)
      : q(Lq * Dp), dout(Lq * Dp), dq(Lq * Dp), lse2(Lq), delta(Lq), k(kBK * Dp), kt(Dp * kBK), vt(Dp * kBK),
        dk(kBK * Dp), dv(kBK * Dp), s(kBQ * kBK), dp(kBQ * kBK), t(kBK * kBQ), ends(Lq),
        tile_end((Lq + kBQ - 1) / kBQ) {}
};

// Probabilities of rows q0.. of a query tile against key tile k0 (0 where masked), from base-2 scores in s.
template <class A>
void probabilities(A* s, const BackwardWorkspace<A>& w, int64_t q0, int64_t rows, int64_t k0, A mul) {
  for (int64_t i = 0; i < rows; ++i) {
    A* row = s + i * kBK;
    const int64_t visible = w.ends[q0 + i] - k0;
    if (visible <= 0) {
      std::fill(row, row + kBK, A(0));
      continue;
    }
    mask_from(row, visible, kBK);
    exp2_row(row, kBK, mul, w.lse2[q0 + i]);
  }
}

// Gradients of the queries against key tile k0 .. k0 + kn, for every query tile that sees part of it.
template <class T>
void backward_key_tile(const BackwardParams& p, int64_t b, int64_t h, int64_t k0, BackwardWorkspace<acc_t<T>>& w) {
  using A = acc_t<T>;
  const int64_t D = p.D, Dp = padded_dim(D);
  const int64_t kn = std::min(kBK, p.Lk - k0);
  const A mul = A(p.scale) * A(1.4426950408889634);
  const T* k = head_ptr<T>(p.k, b, h) + k0 * p.k.sl;
  const T* v = head_ptr<T>(p.v, b, h) + k0 * p.v.sl;
  pack_rows(w.k.data(), kn, Dp, k, p.k.sl, kn, D, A(1));
  pack_transposed(w.kt.data(), Dp, k, p.k.sl, kn, D);
  pack_transposed(w.vt.data(), Dp, v, p.v.sl, kn, D);
  std::fill(w.dk.begin(), w.dk.end(), A(0));
  std::fill(w.dv.begin(), w.dv.end(), A(0));

  for (int64_t qt = 0; qt < int64_t(w.tile_end.size()); ++qt) {
    if (w.tile_end[qt] <= k0) continue;
    const int64_t first = qt * kBQ;
    const auto [lo, hi] = rows_seeing(w.ends.data() + first, std::min(kBQ, p.Lq - first), k0);
    const int64_t q0 = first + lo, rows = hi - lo;
    const A* q = w.q.data() + q0 * Dp;
    const A* dout = w.dout.data() + q0 * Dp;
    gemm(rows, kBK, Dp, q, Dp, w.kt.data(), kBK, w.s.data(), kBK, false);
    probabilities(w.s.data(), w, q0, rows, k0, mul);
    transpose_tile(w.t.data(), w.s.data(), rows, kn);
    gemm(kn, Dp, rows, w.t.data(), kBQ, dout, Dp, w.dv.data(), Dp, true);      // dV += P^T dO
    gemm(rows, kBK, Dp, dout, Dp, w.vt.data(), kBK, w.dp.data(), kBK, false);  // dP = dO V^T
    for (int64_t i = 0; i < rows; ++i) {                                       // dS = P (dP - delta)
      const A* pr = w.s.data() + i * kBK;
      A* ds = w.dp.data() + i * kBK;
      const A delta = w.delta[q0 + i];
      for (int64_t j = 0; j < kBK; ++j) ds[j] = pr[j] * (ds[j] - delta);
    }
    gemm(rows, Dp, kn, w.dp.data(), kBK, w.k.data(), Dp, w.dq.data() + q0 * Dp, Dp, true);  // dQ += dS K
    transpose_tile(w.t.data(), w.dp.data(), rows, kn);
    gemm(kn, Dp, rows, w.t.data(), kBQ, q, Dp, w.dk.data(), Dp, true);  // dK += dS^T Q
  }

  T* dk = static_cast<T*>(p.dk.data) + b * p.dk.sb + h * p.dk.sh + k0 * p.dk.sl;
  T* dv = static_cast<T*>(p.dv.data) + b * p.dv.sb + h * p.dv.sh + k0 * p.dv.sl;
  for (int64_t j = 0; j < kn; ++j) {
    for (int64_t d = 0; d < D; ++d) {
      dk[j * p.dk.sl + d] = static_cast<T>(w.dk[j * Dp + d] * A(p.scale));
      dv[j * p.dv.sl + d] = static_cast<T>(w.dv[j * Dp + d]);
    }
  }
}

// All gradients of head (b, h).
template <class T>
void backward_head(const BackwardParams& p, int64_t b, int64_t h, BackwardWorkspace<acc_t<T>>& w) {
  using A = acc_t<T>;
  const int64_t D = p.D, Dp = padded_dim(D), Lq = p.Lq;
  pack_rows(w.q.data(), Lq, Dp, head_ptr<T>(p.q, b, h), p.q.sl, Lq, D, A(1));
  pack_rows(w.dout.data(), Lq, Dp, head_ptr<T>(p.dout, b, h), p.dout.sl, Lq, D, A(1));
  std::fill(w.dq.begin(), w.dq.end(), A(0));
  const A* lse = static_cast<const A*>(p.lse) + (b * p.H + h) * Lq;
  const A* delta = static_cast<const A*>(p.delta) + (b * p.H + h) * Lq;
  std::fill(w.tile_end.begin(), w.tile_end.end(), int64_t(0));
  for (int64_t i = 0; i < Lq; ++i) {
    w.lse2[i] = lse[i] * A(1.4426950408889634);
    w.delta[i] = delta[i];
    w.ends[i] = p.visible_end[i];
    w.tile_end[i / kBQ] = std::max(w.tile_end[i / kBQ], w.ends[i]);
  }
  for (int64_t k0 = 0; k0 < p.Lk; k0 += kBK) backward_key_tile<T>(p, b, h, k0, w);

  T* dq = static_cast<T*>(p.dq.data) + b * p.dq.sb + h * p.dq.sh;
  for (int64_t i = 0; i < Lq; ++i) {
    for (int64_t d = 0; d < D; ++d) dq[i * p.dq.sl + d] = static_cast<T>(w.dq[i * Dp + d] * A(p.scale));
  }
}

// ------------------------------------------------------------------------------------------------ entry points
// Tasks are (batch, head, run of query tiles): one run per head when there are enough heads to keep every thread
// busy (the keys are then packed once per head), more when there are few heads. Threads take tasks from a shared
// counter, the last runs first (they see the most keys under causal-like masks), so that a thread slowed down by
// other load on the machine does not hold the others up and the short tasks fill the gaps at the end.
template <class T>
void forward(const ForwardParams& p) {
  const int64_t tiles = (p.Lq + kBQ - 1) / kBQ, heads = p.B * p.H;
  const int64_t runs = std::clamp<int64_t>((4 * at::get_num_threads() + heads - 1) / heads, 1, tiles);
  const int64_t per_run = (tiles + runs - 1) / runs, tasks = heads * runs;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    ForwardWorkspace<acc_t<T>> w(p.Lk, padded_dim(p.D));
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t bh = task % heads, run = runs - 1 - task / heads;
      const int64_t first = run * per_run * kBQ, last = std::min(p.Lq, first + per_run * kBQ);
      if (first >= last) continue;
      const int64_t key_end = *std::max_element(p.visible_end + first, p.visible_end + last);
      pack_keys<T>(p, bh / p.H, bh % p.H, key_end, w);
      for (int64_t q0 = first; q0 < last; q0 += kBQ) forward_tile<T>(p, bh / p.H, bh % p.H, q0, w);
    }
  });
}

// One task per (batch, head), taken from a shared counter like the forward's.
template <class T>
void backward(const BackwardParams& p) {
  const int64_t heads = p.B * p.H;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(heads, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    BackwardWorkspace<acc_t<T>> w(p.Lq, padded_dim(p.D));
    for (int64_t bh = next++; bh < heads; bh = next++) backward_head<T>(p, bh / p.H, bh % p.H, w);
  });
}
