// Self-test kernels of the host emulation (csrc/simt/): plain CUDA that nvcc compiles for the GPU and
// selftest_simt.cpp compiles as C++ with VARCORE_SIMT, each with a host launcher over raw pointers. The tests in
// tests/ops/test_simt.py compare them with PyTorch; two of them are wrong on purpose (a missing barrier, a barrier in
// divergent code) and one misuses warp operations, to show that the emulator catches such bugs.
#include "../common/cuda_compat.h"
#include "../common/mma.h"

namespace varcore::simt_selftest {

// Lanes of warp `warp` that exist in the block (all 32 unless it is the last, partial warp).
VC_DEVICE_INLINE unsigned warp_lanes(unsigned warp) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned lanes = min(32u, threads - warp * 32u);
  return lanes == 32u ? 0xffffffffu : (1u << lanes) - 1u;
}

VC_DEVICE_INLINE long long global_index() { return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; }

// ---- block reduction through static shared memory (tree) ----------------------------------------------------

// Per-block sums of the first `active` elements of each block, for any blockDim.x <= 1024. The other threads
// return at once, which __syncthreads allows (it does not wait for threads that have returned). kRacy plants a
// bug: the barrier inside the tree is missing, so a thread reads a partial sum before the thread that owns it has
// added to it.
template <bool kRacy>
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ block_sums, long long n,
                                 unsigned active) {
  __shared__ float s[1024];
  const unsigned t = threadIdx.x;
  if (t >= active) return;
  const long long i = global_index();
  s[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  unsigned span = 1;
  while (span < active) span <<= 1;
  for (unsigned stride = span / 2; stride > 0; stride >>= 1) {
    if (t < stride && t + stride < active) s[t] += s[t + stride];
    if (!kRacy) __syncthreads();
  }
  if (t == 0) block_sums[blockIdx.x] = s[0];
}

void block_sum(const float* x, float* block_sums, long long n, int threads, int active, bool racy,
               cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  const unsigned a = static_cast<unsigned>(active);
  if (racy) {
    VC_LAUNCH(block_sum_kernel<true>, blocks, threads, 0, stream, x, block_sums, n, a);
  } else {
    VC_LAUNCH(block_sum_kernel<false>, blocks, threads, 0, stream, x, block_sums, n, a);
  }
  VC_CHECK_LAUNCH();
}

// ---- warp-shuffle reduction ------------------------------------------------------------------------------------

// Per-block sums: shuffle-down within each warp (the last warp may be partial), then one warp combines the warp
// sums with a butterfly (xor) shuffle.
__global__ void warp_sum_kernel(const float* __restrict__ x, float* __restrict__ block_sums, long long n) {
  __shared__ float warp_sums[32];
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = threadIdx.x >> 5;
  const unsigned warps = (blockDim.x + 31u) / 32u;
  const unsigned mask = warp_lanes(warp);
  const unsigned lanes = static_cast<unsigned>(__popc(mask));
  const long long i = global_index();
  float v = i < n ? x[i] : 0.0f;
  for (unsigned offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_down_sync(mask, v, offset);
    if (lane + offset < lanes) v += other;  // a lane past the end of a partial warp has nothing to give
  }
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? warp_sums[lane] : 0.0f;
    if (warps > 1) {  // then warp 0 is complete
      for (int offset = 16; offset > 0; offset >>= 1) w += __shfl_xor_sync(0xffffffffu, w, offset);
    }
    if (lane == 0) block_sums[blockIdx.x] = w;
  }
}

void warp_sum(const float* x, float* block_sums, long long n, int threads, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  VC_LAUNCH(warp_sum_kernel, blocks, threads, 0, stream, x, block_sums, n);
  VC_CHECK_LAUNCH();
}

// Inclusive scan within segments of `width` lanes (__shfl_up_sync) and each segment's total broadcast from its
// last lane (__shfl_sync). blockDim.x is a multiple of 32.
__global__ void warp_scan_kernel(const float* __restrict__ x, float* __restrict__ scan, float* __restrict__ totals,
                                 long long n, int width) {
  const unsigned lane = threadIdx.x & 31u;
  const long long i = global_index();
  float v = i < n ? x[i] : 0.0f;
  for (int d = 1; d < width; d <<= 1) {
    const float up = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(d), width);
    if (static_cast<int>(lane) % width >= d) v += up;
  }
  const float total = __shfl_sync(0xffffffffu, v, width - 1, width);
  if (i < n) {
    scan[i] = v;
    totals[i] = total;
  }
}

void warp_scan(const float* x, float* scan, float* totals, long long n, int threads, int width, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  VC_LAUNCH(warp_scan_kernel, blocks, threads, 0, stream, x, scan, totals, n, width);
  VC_CHECK_LAUNCH();
}

// One warp; each lane shuffles its own lane id. Per lane: what __shfl_sync, __shfl_up_sync, __shfl_down_sync and
// __shfl_xor_sync return for (arg, width), then a butterfly over the lane's half-warp done by the two halves as
// separate groups (their own masks, each after a __syncwarp of its half). Lane `exit_lane` (if in [0, 32)) returns
// first; reading it gives what the emulator gives for a lane that does not take part (-1 for an int).
__global__ void shuffle_modes_kernel(int* out, int arg, int width, int exit_lane) {
  const int lane = static_cast<int>(threadIdx.x);
  if (lane == exit_lane) return;
  int* o = out + lane * 5;
  o[0] = __shfl_sync(0xffffffffu, lane, arg, width);
  o[1] = __shfl_up_sync(0xffffffffu, lane, static_cast<unsigned>(arg), width);
  o[2] = __shfl_down_sync(0xffffffffu, lane, static_cast<unsigned>(arg), width);
  o[3] = __shfl_xor_sync(0xffffffffu, lane, arg, width);
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  __syncwarp(half);
  o[4] = __shfl_xor_sync(half, lane, 1);
}

void shuffle_modes(int* out, int arg, int width, int exit_lane, cudaStream_t stream) {
  VC_LAUNCH(shuffle_modes_kernel, 1, 32, 0, stream, out, arg, width, exit_lane);
  VC_CHECK_LAUNCH();
}

// ---- atomics -----------------------------------------------------------------------------------------------

VC_DEVICE_INLINE float atomic_max_float(float* address, float value) {
  int* p = reinterpret_cast<int*>(address);
  int old = *p;
  while (__int_as_float(old) < value) {
    const int assumed = old;
    old = atomicCAS(p, assumed, __float_as_int(value));
    if (old == assumed) break;
  }
  return __int_as_float(old);
}

// A histogram of bin indices (values outside [0, bins) are skipped) with, per bin: the count (block-private
// counters in dynamic shared memory, then one global atomicAdd per bin and block), the first and last index
// (atomicMin/atomicMax), the sum of i % 7 (float atomicAdd) and the largest ((37 i) % 101) / 4 (atomicCAS loop).
// A grid-stride loop, so that each thread handles several elements.
__global__ void histogram_kernel(const int* __restrict__ x, long long n, int bins, unsigned long long* counts,
                                 int* first, int* last, float* weight_sum, float* weight_max) {
  VC_DYNAMIC_SHARED(unsigned int, local);
  for (int b = threadIdx.x; b < bins; b += blockDim.x) local[b] = 0u;
  __syncthreads();
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = global_index(); i < n; i += stride) {
    const int b = x[i];
    if (b < 0 || b >= bins) continue;
    atomicAdd(&local[b], 1u);
    atomicMin(&first[b], static_cast<int>(i));
    atomicMax(&last[b], static_cast<int>(i));
    atomicAdd(&weight_sum[b], static_cast<float>(i % 7));
    atomic_max_float(&weight_max[b], static_cast<float>((37 * i) % 101) * 0.25f);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) {
    if (local[b] != 0u) atomicAdd(&counts[b], static_cast<unsigned long long>(local[b]));
  }
}

void histogram(const int* x, long long n, int bins, unsigned long long* counts, int* first, int* last,
               float* weight_sum, float* weight_max, int threads, int blocks, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(bins) * sizeof(unsigned int);
  VC_LAUNCH(histogram_kernel, blocks, threads, smem, stream, x, n, bins, counts, first, last, weight_sum,
            weight_max);
  VC_CHECK_LAUNCH();
}

// Every other atomic, each with an order-independent result (see tests/ops/test_simt.py for the expected values):
//   ints:  [0] ticket counter (atomicAdd), [1] atomicSub of i, [2] atomicExch of i, [3] atomicMin, [4] atomicMax
//   uints: [0] atomicOr, [1] atomicAnd, [2] atomicXor, [3] atomicInc(16), [4] atomicDec(16), [5] atomicMax,
//          [6] atomicMin
//   ulls:  [0] atomicAdd, [1] atomicMax, [2] atomicMin, [3] +3 by an atomicCAS loop, [4] atomicExch, [5] atomicOr
//   lls:   [0] atomicMax, [1] atomicMin;  doubles: [0] atomicAdd of i / 2, [1] sum of atomicExch(float) results
//   floats: [0] atomicExch of i
// tickets[i] and exchanged[i] receive the old values of the ticket counter and of ints[2].
__global__ void atomics_kernel(long long n, int* ints, unsigned int* uints, unsigned long long* ulls, long long* lls,
                               double* doubles, float* floats, int* tickets, int* exchanged) {
  const long long i = global_index();
  if (i >= n) return;
  const int k = static_cast<int>(i);
  const unsigned u = static_cast<unsigned>(i);
  const unsigned long long ull = static_cast<unsigned long long>(i);
  tickets[i] = atomicAdd(&ints[0], 1);
  atomicSub(&ints[1], k);
  exchanged[i] = atomicExch(&ints[2], k);
  atomicMin(&ints[3], k * 3 - 1000);
  atomicMax(&ints[4], (k % 1009) * 7919 % 1009);
  atomicOr(&uints[0], 1u << (u % 32u));
  atomicAnd(&uints[1], ~(1u << (u % 29u)));
  atomicXor(&uints[2], u * 2654435761u);
  atomicInc(&uints[3], 16u);
  atomicDec(&uints[4], 16u);
  atomicMax(&uints[5], (u * 40503u) % 65521u);
  atomicMin(&uints[6], (u * 40503u) % 65521u + 7u);
  atomicAdd(&ulls[0], ull * 1000000007ull);
  atomicMax(&ulls[1], ull * ull);
  atomicMin(&ulls[2], ull * ull + 5ull);
  unsigned long long seen = ulls[3];
  for (;;) {
    const unsigned long long assumed = seen;
    seen = atomicCAS(&ulls[3], assumed, assumed + 3ull);
    if (seen == assumed) break;
  }
  atomicExch(&ulls[4], 42ull);
  atomicOr(&ulls[5], 1ull << (ull % 64ull));
  atomicMax(&lls[0], (static_cast<long long>(i) - n / 2) * 3);
  atomicMin(&lls[1], (static_cast<long long>(i) - n / 2) * 3);
  atomicAdd(&doubles[0], static_cast<double>(i) * 0.5);
  atomicAdd(&doubles[1], static_cast<double>(atomicExch(&floats[0], static_cast<float>(i))));
}

void atomics(long long n, int* ints, unsigned int* uints, unsigned long long* ulls, long long* lls, double* doubles,
             float* floats, int* tickets, int* exchanged, int threads, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  VC_LAUNCH(atomics_kernel, blocks, threads, 0, stream, n, ints, uints, ulls, lls, doubles, floats, tickets,
            exchanged);
  VC_CHECK_LAUNCH();
}

// ---- tile transpose: 2-D blocks and grid ---------------------------------------------------------------------

constexpr int kTile = 32;
constexpr int kTileRows = 8;

// out (cols x rows) = in (rows x cols)^T through a 32x33 shared tile (the padding column avoids bank conflicts);
// a 32x8 block moves a 32x32 tile, each thread four elements.
__global__ void transpose_kernel(const float* __restrict__ in, float* __restrict__ out, int rows, int cols) {
  __shared__ float tile[kTile][kTile + 1];
  const int c0 = static_cast<int>(blockIdx.x) * kTile;
  const int r0 = static_cast<int>(blockIdx.y) * kTile;
  const int tx = static_cast<int>(threadIdx.x);
  for (int j = static_cast<int>(threadIdx.y); j < kTile; j += static_cast<int>(blockDim.y)) {
    const int r = r0 + j;
    const int c = c0 + tx;
    if (r < rows && c < cols) tile[j][tx] = in[static_cast<long long>(r) * cols + c];
  }
  __syncthreads();
  for (int j = static_cast<int>(threadIdx.y); j < kTile; j += static_cast<int>(blockDim.y)) {
    const int out_row = c0 + j;   // a column of in
    const int out_col = r0 + tx;  // a row of in
    if (out_row < cols && out_col < rows) out[static_cast<long long>(out_row) * rows + out_col] = tile[tx][j];
  }
}

void transpose(const float* in, float* out, int rows, int cols, cudaStream_t stream) {
  const dim3 grid((cols + kTile - 1) / kTile, (rows + kTile - 1) / kTile);
  const dim3 block(kTile, kTileRows);
  VC_LAUNCH(transpose_kernel, grid, block, 0, stream, in, out, rows, cols);
  VC_CHECK_LAUNCH();
}

// ---- dynamic shared memory ---------------------------------------------------------------------------------

// Inclusive scan of each block's chunk (Hillis-Steele over two buffers of blockDim.x elements in dynamic shared
// memory, whose size is chosen at launch). Templated, which is where typed extern __shared__ arrays conflict.
template <class T>
__global__ void block_scan_kernel(const T* __restrict__ x, T* __restrict__ out, long long n) {
  VC_DYNAMIC_SHARED(T, buffer);
  const unsigned t = threadIdx.x;
  const long long i = global_index();
  T* cur = buffer;
  T* next = buffer + blockDim.x;
  cur[t] = i < n ? x[i] : T(0);
  __syncthreads();
  for (unsigned d = 1; d < blockDim.x; d <<= 1) {
    next[t] = t >= d ? cur[t] + cur[t - d] : cur[t];
    __syncthreads();
    T* tmp = cur;
    cur = next;
    next = tmp;
  }
  if (i < n) out[i] = cur[t];
}

// pad_bytes enlarges the dynamic shared memory; above 48 KiB the kernel must opt in, as on the GPU.
template <class T>
void block_scan(const T* x, T* out, long long n, int threads, size_t pad_bytes, cudaStream_t stream) {
  auto kernel = block_scan_kernel<T>;
  const size_t smem = 2 * static_cast<size_t>(threads) * sizeof(T) + pad_bytes;
  if (smem > 48 * 1024) {
    VC_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  VC_LAUNCH(kernel, blocks, threads, smem, stream, x, out, n);
  VC_CHECK_LAUNCH();
}

template void block_scan<float>(const float*, float*, long long, int, size_t, cudaStream_t);
template void block_scan<double>(const double*, double*, long long, int, size_t, cudaStream_t);

// ---- votes ----------------------------------------------------------------------------------------------------

// Per warp: __ballot_sync, __any_sync and __all_sync over the lanes that exist; per block: __syncthreads_count,
// __syncthreads_and and __syncthreads_or. Elements past n vote false.
__global__ void vote_kernel(const bool* __restrict__ pred, long long n, unsigned int* ballots, int* any_all,
                            int* block_votes) {
  const unsigned lane = threadIdx.x & 31u;
  const unsigned warp = threadIdx.x >> 5;
  const unsigned mask = warp_lanes(warp);
  const long long i = global_index();
  const int p = i < n ? static_cast<int>(pred[i]) : 0;
  const unsigned ballot = __ballot_sync(mask, p);
  const int any = __any_sync(mask, p);
  const int all = __all_sync(mask, p);
  const int count = __syncthreads_count(p);
  const int all_block = __syncthreads_and(p);
  const int any_block = __syncthreads_or(p);
  const long long w = static_cast<long long>(blockIdx.x) * ((blockDim.x + 31u) / 32u) + warp;
  if (lane == 0) {
    ballots[w] = ballot;
    any_all[2 * w] = any;
    any_all[2 * w + 1] = all;
  }
  if (threadIdx.x == 0) {
    block_votes[3 * blockIdx.x] = count;
    block_votes[3 * blockIdx.x + 1] = all_block;
    block_votes[3 * blockIdx.x + 2] = any_block;
  }
}

void vote(const bool* pred, long long n, unsigned int* ballots, int* any_all, int* block_votes, int threads,
          cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  VC_LAUNCH(vote_kernel, blocks, threads, 0, stream, pred, n, ballots, any_all, block_votes);
  VC_CHECK_LAUNCH();
}

// ---- 16-bit floats -----------------------------------------------------------------------------------------

// Round trips through __half and __nv_bfloat16, and h * 0.75 + h in __half arithmetic.
__global__ void half_kernel(const float* __restrict__ x, float* __restrict__ half_out, float* __restrict__ bf16_out,
                            float* __restrict__ arith_out, long long n) {
  const long long i = global_index();
  if (i >= n) return;
  const __half h = __float2half(x[i]);
  half_out[i] = __half2float(h);
  bf16_out[i] = __bfloat162float(__float2bfloat16(x[i]));
  arith_out[i] = __half2float(h * __float2half(0.75f) + h);
}

void half_roundtrip(const float* x, float* half_out, float* bf16_out, float* arith_out, long long n,
                    cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + 127) / 128);
  VC_LAUNCH(half_kernel, blocks, 128, 0, stream, x, half_out, bf16_out, arith_out, n);
  VC_CHECK_LAUNCH();
}

// ---- math intrinsics ----------------------------------------------------------------------------------------

constexpr int kMathFloats = 12;
constexpr int kMathInts = 11;

// One row of results per element: float intrinsics in f, integer conversions and bit operations in k.
__global__ void math_kernel(const float* __restrict__ x, float* __restrict__ f, int* __restrict__ k, long long n) {
  const long long i = global_index();
  if (i >= n) return;
  const float v = __ldg(&x[i]);
  const float a = fabsf(v);
  float* fo = f + i * kMathFloats;
  fo[0] = __expf(v);
  fo[1] = __logf(a + 1.0f);
  fo[2] = rsqrtf(a + 1.0f);
  fo[3] = __fdividef(v, 3.0f);
  fo[4] = fmaxf(v, 0.5f);
  fo[5] = fminf(v, -0.5f);
  fo[6] = __saturatef(v);
  fo[7] = __sinf(v);
  fo[8] = __cosf(v);
  fo[9] = __powf(a, 1.5f);
  fo[10] = __fmaf_rn(v, 2.0f, 1.0f);
  fo[11] = __int_as_float(__float_as_int(v));
  const int bits = __float_as_int(v);
  int* ko = k + i * kMathInts;
  ko[0] = __float2int_rn(v);
  ko[1] = __float2int_rz(v);
  ko[2] = __float2int_rd(v);
  ko[3] = __float2int_ru(v);
  ko[4] = bits;
  ko[5] = __popc(static_cast<unsigned>(bits));
  ko[6] = __clz(bits);
  ko[7] = __ffs(bits);
  ko[8] = static_cast<int>(__brev(static_cast<unsigned>(bits)));
  ko[9] = min(bits, 12345);
  ko[10] = max(bits, -12345);
}

void math(const float* x, float* f, int* k, long long n, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + 127) / 128);
  VC_LAUNCH(math_kernel, blocks, 128, 0, stream, x, f, k, n);
  VC_CHECK_LAUNCH();
}

// ---- launch configuration ----------------------------------------------------------------------------------

// Counts the threads that ran and touches the last byte of the dynamic shared memory.
__global__ void count_threads_kernel(unsigned long long* count, unsigned smem) {
  VC_DYNAMIC_SHARED(unsigned char, bytes);
  if (smem > 0 && threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0) bytes[smem - 1] = 1;
  atomicAdd(count, 1ull);
}

// Sets the kernel's dynamic shared memory limit first: with opt_in to smem_bytes (as far as the GPU allows),
// otherwise back to the default 48 KiB.
void count_threads(unsigned long long* count, dim3 grid, dim3 block, unsigned smem_bytes, bool opt_in,
                   cudaStream_t stream) {
  const unsigned limit = opt_in ? min(max(smem_bytes, 48u * 1024u), 227u * 1024u) : 48u * 1024u;
  VC_CHECK_CUDA(
      cudaFuncSetAttribute(count_threads_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
  VC_LAUNCH(count_threads_kernel, grid, block, smem_bytes, stream, count, smem_bytes);
  VC_CHECK_LAUNCH();
}

// ---- deliberately broken kernels (for the emulator's error reports; never launch them on a GPU) ---------------

// Only the lower half of each warp reaches the __syncthreads; the upper half goes on to a full-warp shuffle that
// waits for the lower half, which waits for them: a deadlock.
__global__ void divergent_barrier_kernel(const float* __restrict__ x, float* __restrict__ out, long long n) {
  const unsigned lane = threadIdx.x & 31u;
  const long long i = global_index();
  float v = i < n ? x[i] : 0.0f;
  if (lane < 16u) {
    v *= 2.0f;
    __syncthreads();
  }
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (i < n) out[i] = v;
}

void divergent_barrier(const float* x, float* out, long long n, int threads, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  VC_LAUNCH(divergent_barrier_kernel, blocks, threads, 0, stream, x, out, n);
  VC_CHECK_LAUNCH();
}

// mode 0: a mask without the calling lane; 1: a shuffle width that is not a power of 2; 2: half of the warp
// shuffles while the other half votes.
__global__ void warp_misuse_kernel(float* out, int mode) {
  const unsigned lane = threadIdx.x & 31u;
  float v = static_cast<float>(lane);
  if (mode == 0) {
    v = __shfl_sync(~(1u << lane), v, 0);
  } else if (mode == 1) {
    v = __shfl_xor_sync(0xffffffffu, v, 1, 3);
  } else if (lane < 16u) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = static_cast<float>(__ballot_sync(0xffffffffu, 1));
  }
  out[threadIdx.x] = v;
}

void warp_misuse(float* out, int mode, cudaStream_t stream) {
  VC_LAUNCH(warp_misuse_kernel, 1, 32, 0, stream, out, mode);
  VC_CHECK_LAUNCH();
}

// ---- tensor-core fragments (common/mma.h) -------------------------------------------------------------------

// One warp: d = a * b + c for 16x16 tiles through common/mma.h (WMMA for 16-bit T), with a and b in memory
// row- or col-major with leading dimension ld (a at element a_offset of its buffer), c and d row-major float
// (ld 16). Each lane also writes the elements its fragments hold after loading ((32, 8) floats each), so that
// the tests can check the fragment layout itself.
template <class T, class LA, class LB>
__global__ void wmma_kernel(const T* a, const T* b, const float* c, float* d, float* frag_a, float* frag_b,
                            float* frag_c, int ld) {
  mma::FragA<T, LA> fa;
  mma::FragB<T, LB> fb;
  mma::Acc<T> acc;
  mma::load(fa, a, ld);
  mma::load(fb, b, ld);
  mma::load_acc(acc, c, 16);
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = 0; i < 8; ++i) {
    frag_a[lane * 8 + i] = mma::to_float(fa.x[i]);
    frag_b[lane * 8 + i] = mma::to_float(fb.x[i]);
    frag_c[lane * 8 + i] = acc.x[i];
  }
  mma::mma(acc, fa, fb);
  mma::store_acc(d, 16, acc);
}

template <class T>
void wmma_tile(const T* a, const T* b, const float* c, float* d, float* frags, bool a_col, bool b_col, int ld,
               cudaStream_t stream) {
  float *fa = frags, *fb = frags + 256, *fc = frags + 512;
  using R = mma::row_major;
  using C = mma::col_major;
  // WMMA fragments of one product share a layout pair; each combination is its own instantiation
  if (!a_col && !b_col) {
    auto k = wmma_kernel<T, R, R>;
    VC_LAUNCH(k, 1, 32, 0, stream, a, b, c, d, fa, fb, fc, ld);
  } else if (!a_col) {
    auto k = wmma_kernel<T, R, C>;
    VC_LAUNCH(k, 1, 32, 0, stream, a, b, c, d, fa, fb, fc, ld);
  } else if (!b_col) {
    auto k = wmma_kernel<T, C, R>;
    VC_LAUNCH(k, 1, 32, 0, stream, a, b, c, d, fa, fb, fc, ld);
  } else {
    auto k = wmma_kernel<T, C, C>;
    VC_LAUNCH(k, 1, 32, 0, stream, a, b, c, d, fa, fb, fc, ld);
  }
  VC_CHECK_LAUNCH();
}

}  // namespace varcore::simt_selftest
