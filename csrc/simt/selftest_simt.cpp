// The self-test kernels of selftest_kernels.cu, compiled for the host emulation and registered as CPU ops
// torch.ops.varcore_simt.selftest_* (built into varcore._simt; tests in tests/ops/test_simt.py). Errors of the
// emulator (bad launch configuration, deadlock) are std::runtime_error, which PyTorch raises as RuntimeError.
#ifndef VARCORE_SIMT
#define VARCORE_SIMT 1
#endif

// ATen first: the emulation's macros (threadIdx, __shared__, ...) are for kernel code only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <climits>
#include <limits>
#include <tuple>
#include <vector>

#include "selftest_kernels.cu"

namespace varcore::simt_selftest {
namespace {

void check_input(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  check_input(t, name, dtype);
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got ", t.dim(), " dimensions");
}

void check_threads(int64_t threads, int64_t multiple_of = 1) {
  TORCH_CHECK(threads >= 1 && threads <= 1024 && threads % multiple_of == 0, "threads must be in [1, 1024]",
              multiple_of > 1 ? " and a multiple of " + std::to_string(multiple_of) : std::string(), ", got ",
              threads);
}

int64_t blocks_for(int64_t n, int64_t threads) { return (n + threads - 1) / threads; }

at::Tensor block_sum_op(const at::Tensor& x, int64_t threads, int64_t active, bool racy) {
  check_vector(x, "x", at::kFloat);
  check_threads(threads);
  TORCH_CHECK(active >= 1 && active <= threads, "active must be in [1, threads], got ", active);
  const int64_t n = x.numel();
  at::Tensor sums = at::empty({blocks_for(n, threads)}, x.options());
  if (n > 0) {
    block_sum(x.data_ptr<float>(), sums.data_ptr<float>(), n, static_cast<int>(threads), static_cast<int>(active),
              racy, nullptr);
  }
  return sums;
}

at::Tensor selftest_block_sum(const at::Tensor& x, int64_t threads) { return block_sum_op(x, threads, threads, false); }

at::Tensor selftest_block_sum_racy(const at::Tensor& x, int64_t threads) {
  return block_sum_op(x, threads, threads, true);
}

at::Tensor selftest_block_sum_early_exit(const at::Tensor& x, int64_t threads, int64_t active) {
  return block_sum_op(x, threads, active, false);
}

at::Tensor selftest_warp_sum(const at::Tensor& x, int64_t threads) {
  check_vector(x, "x", at::kFloat);
  check_threads(threads);
  const int64_t n = x.numel();
  at::Tensor sums = at::empty({blocks_for(n, threads)}, x.options());
  if (n > 0) warp_sum(x.data_ptr<float>(), sums.data_ptr<float>(), n, static_cast<int>(threads), nullptr);
  return sums;
}

std::tuple<at::Tensor, at::Tensor> selftest_warp_scan(const at::Tensor& x, int64_t threads, int64_t width) {
  check_vector(x, "x", at::kFloat);
  check_threads(threads, 32);
  TORCH_CHECK(width >= 1 && width <= 32 && (width & (width - 1)) == 0, "width must be a power of 2 in [1, 32], got ",
              width);
  const int64_t n = x.numel();
  at::Tensor scan = at::empty_like(x);
  at::Tensor totals = at::empty_like(x);
  if (n > 0) {
    warp_scan(x.data_ptr<float>(), scan.data_ptr<float>(), totals.data_ptr<float>(), n, static_cast<int>(threads),
              static_cast<int>(width), nullptr);
  }
  return {scan, totals};
}

at::Tensor selftest_shuffle_modes(int64_t arg, int64_t width, int64_t exit_lane) {
  TORCH_CHECK(arg >= INT_MIN && arg <= INT_MAX, "arg must fit in an int, got ", arg);
  TORCH_CHECK(width >= 1 && width <= 32 && (width & (width - 1)) == 0, "width must be a power of 2 in [1, 32], got ",
              width);
  TORCH_CHECK(exit_lane >= -1 && exit_lane < 32, "exit_lane must be in [-1, 32), got ", exit_lane);
  at::Tensor out = at::full({32, 5}, INT_MIN, at::TensorOptions().dtype(at::kInt));
  shuffle_modes(out.data_ptr<int>(), static_cast<int>(arg), static_cast<int>(width), static_cast<int>(exit_lane),
                nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> selftest_histogram(const at::Tensor& x,
                                                                                          int64_t bins,
                                                                                          int64_t threads,
                                                                                          int64_t blocks) {
  check_vector(x, "x", at::kInt);
  TORCH_CHECK(x.numel() <= INT_MAX, "x has ", x.numel(), " elements; the histogram records int indices");
  TORCH_CHECK(bins >= 1 && bins <= 8192, "bins must be in [1, 8192], got ", bins);
  check_threads(threads);
  TORCH_CHECK(blocks >= 1 && blocks <= 65535, "blocks must be in [1, 65535], got ", blocks);
  const auto opts = x.options();
  at::Tensor counts = at::zeros({bins}, opts.dtype(at::kLong));
  at::Tensor first = at::full({bins}, INT_MAX, opts);
  at::Tensor last = at::full({bins}, -1, opts);
  at::Tensor weight_sum = at::zeros({bins}, opts.dtype(at::kFloat));
  at::Tensor weight_max = at::full({bins}, -std::numeric_limits<float>::infinity(), opts.dtype(at::kFloat));
  histogram(x.data_ptr<int>(), x.numel(), static_cast<int>(bins),
            reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), first.data_ptr<int>(),
            last.data_ptr<int>(), weight_sum.data_ptr<float>(), weight_max.data_ptr<float>(),
            static_cast<int>(threads), static_cast<int>(blocks), nullptr);
  return {counts, first, last, weight_sum, weight_max};
}

// Returns (ints, uints, ulls, lls, doubles, floats, tickets, exchanged); see atomics_kernel for their meaning.
// Unsigned results are returned in int64 tensors.
std::vector<at::Tensor> selftest_atomics(int64_t n, int64_t threads) {
  TORCH_CHECK(n >= 1 && n <= (1 << 20), "n must be in [1, 2^20], got ", n);
  check_threads(threads);
  const auto i32 = at::TensorOptions().dtype(at::kInt);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor ints = at::tensor({0, 0, -1, INT_MAX, INT_MIN}, i32);
  at::Tensor uints = at::tensor({0, -1, 0, 0, 0, 0, -1}, i32);  // reinterpreted as unsigned
  at::Tensor ulls = at::tensor({int64_t{0}, int64_t{0}, int64_t{-1}, int64_t{0}, int64_t{7}, int64_t{0}}, i64);
  at::Tensor lls = at::tensor({std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()}, i64);
  at::Tensor doubles = at::zeros({2}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor floats = at::full({1}, -1.0f, at::TensorOptions().dtype(at::kFloat));
  at::Tensor tickets = at::empty({n}, i32);
  at::Tensor exchanged = at::empty({n}, i32);
  atomics(n, ints.data_ptr<int>(), reinterpret_cast<unsigned int*>(uints.data_ptr<int>()),
          reinterpret_cast<unsigned long long*>(ulls.data_ptr<int64_t>()),
          reinterpret_cast<long long*>(lls.data_ptr<int64_t>()), doubles.data_ptr<double>(),
          floats.data_ptr<float>(), tickets.data_ptr<int>(), exchanged.data_ptr<int>(), static_cast<int>(threads),
          nullptr);
  // uints as unsigned values
  at::Tensor uints64 = uints.to(at::kLong).bitwise_and(0xffffffffLL);
  return {ints, uints64, ulls, lls, doubles, floats, tickets, exchanged};
}

at::Tensor selftest_transpose(const at::Tensor& x) {
  check_input(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D, got ", x.dim(), " dimensions");
  TORCH_CHECK(x.size(0) <= INT_MAX && x.size(1) <= INT_MAX, "x is too large: ", x.sizes());
  const int rows = static_cast<int>(x.size(0));
  const int cols = static_cast<int>(x.size(1));
  at::Tensor out = at::empty({cols, rows}, x.options());
  if (x.numel() > 0) transpose(x.data_ptr<float>(), out.data_ptr<float>(), rows, cols, nullptr);
  return out;
}

at::Tensor selftest_dynamic_smem(const at::Tensor& x, int64_t threads, int64_t pad_bytes) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64, got ", x.scalar_type());
  check_vector(x, "x", x.scalar_type());
  check_threads(threads);
  TORCH_CHECK(pad_bytes >= 0 && pad_bytes <= (1 << 20), "pad_bytes must be in [0, 2^20], got ", pad_bytes);
  const int64_t n = x.numel();
  at::Tensor out = at::empty_like(x);
  if (n == 0) return out;
  if (x.scalar_type() == at::kFloat) {
    block_scan<float>(x.data_ptr<float>(), out.data_ptr<float>(), n, static_cast<int>(threads),
                      static_cast<size_t>(pad_bytes), nullptr);
  } else {
    block_scan<double>(x.data_ptr<double>(), out.data_ptr<double>(), n, static_cast<int>(threads),
                       static_cast<size_t>(pad_bytes), nullptr);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selftest_ballot(const at::Tensor& pred, int64_t threads) {
  check_vector(pred, "pred", at::kBool);
  check_threads(threads);
  const int64_t n = pred.numel();
  const int64_t blocks = blocks_for(n, threads);
  const int64_t warps = blocks * ((threads + 31) / 32);
  const auto i32 = at::TensorOptions().dtype(at::kInt);
  at::Tensor ballots = at::empty({warps}, i32);
  at::Tensor any_all = at::empty({warps, 2}, i32);
  at::Tensor block_votes = at::empty({blocks, 3}, i32);
  if (n > 0) {
    vote(pred.data_ptr<bool>(), n, reinterpret_cast<unsigned int*>(ballots.data_ptr<int>()), any_all.data_ptr<int>(),
         block_votes.data_ptr<int>(), static_cast<int>(threads), nullptr);
  }
  return {ballots.to(at::kLong).bitwise_and(0xffffffffLL), any_all, block_votes};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selftest_half(const at::Tensor& x) {
  check_vector(x, "x", at::kFloat);
  at::Tensor half_out = at::empty_like(x);
  at::Tensor bf16_out = at::empty_like(x);
  at::Tensor arith_out = at::empty_like(x);
  if (x.numel() > 0) {
    half_roundtrip(x.data_ptr<float>(), half_out.data_ptr<float>(), bf16_out.data_ptr<float>(),
                   arith_out.data_ptr<float>(), x.numel(), nullptr);
  }
  return {half_out, bf16_out, arith_out};
}

std::tuple<at::Tensor, at::Tensor> selftest_math(const at::Tensor& x) {
  check_vector(x, "x", at::kFloat);
  at::Tensor f = at::empty({x.numel(), kMathFloats}, x.options());
  at::Tensor k = at::empty({x.numel(), kMathInts}, x.options().dtype(at::kInt));
  if (x.numel() > 0) math(x.data_ptr<float>(), f.data_ptr<float>(), k.data_ptr<int>(), x.numel(), nullptr);
  return {f, k};
}

at::Tensor selftest_divergent_barrier(const at::Tensor& x, int64_t threads) {
  check_vector(x, "x", at::kFloat);
  check_threads(threads, 32);
  at::Tensor out = at::empty_like(x);
  if (x.numel() > 0) {
    divergent_barrier(x.data_ptr<float>(), out.data_ptr<float>(), x.numel(), static_cast<int>(threads), nullptr);
  }
  return out;
}

at::Tensor selftest_warp_misuse(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2, got ", mode);
  at::Tensor out = at::empty({32}, at::TensorOptions().dtype(at::kFloat));
  warp_misuse(out.data_ptr<float>(), static_cast<int>(mode), nullptr);
  return out;
}

// Launches a kernel that counts its threads with the given configuration; returns the count. The values reach
// the emulator's launch validation unchanged (only what does not fit in 32 bits is rejected here).
at::Tensor selftest_launch(int64_t gx, int64_t gy, int64_t gz, int64_t bx, int64_t by, int64_t bz, int64_t smem,
                           bool opt_in) {
  const std::pair<const char*, int64_t> values[] = {{"gx", gx}, {"gy", gy}, {"gz", gz}, {"bx", bx},
                                                    {"by", by}, {"bz", bz}, {"smem", smem}};
  for (const auto& [name, v] : values) {
    TORCH_CHECK(v >= 0 && v <= UINT_MAX, name, " must be in [0, 2^32), got ", v);
  }
  // Refuse long runs, but leave configurations beyond the CUDA limits to the emulator, which reports them.
  // (Products in double: they cannot overflow.)
  const double block_threads = static_cast<double>(bx) * static_cast<double>(by) * static_cast<double>(bz);
  const bool within_limits = gx <= varcore::simt::kMaxGridDimX && gy <= varcore::simt::kMaxGridDimYZ &&
                             gz <= varcore::simt::kMaxGridDimYZ && bz <= varcore::simt::kMaxBlockDimZ &&
                             block_threads <= static_cast<double>(varcore::simt::kMaxThreadsPerBlock);
  const double total = static_cast<double>(gx) * static_cast<double>(gy) * static_cast<double>(gz) * block_threads;
  TORCH_CHECK(!within_limits || total <= 4194304.0, "selftest_launch runs at most 2^22 threads, got ", total);
  at::Tensor count = at::zeros({1}, at::TensorOptions().dtype(at::kLong));
  count_threads(reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()),
                dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz)),
                dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by), static_cast<unsigned>(bz)),
                static_cast<unsigned>(smem), opt_in, nullptr);
  return count;
}

// d = a * b + c for one 16x16 tile through common/mma.h, plus what each lane's fragments hold: a_mem and b_mem
// are 1-D __half or bfloat16 buffers holding the tiles row- or col-major with leading dimension ld (a from
// element a_offset on), c is (16, 16) float. Returns d (16, 16) and the a, b and c fragments (32, 8) each.
std::vector<at::Tensor> selftest_wmma(const at::Tensor& a_mem, const at::Tensor& b_mem, const at::Tensor& c,
                                      bool a_col_major, bool b_col_major, int64_t ld, int64_t a_offset) {
  const auto dtype = a_mem.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "a_mem must be float16 or bfloat16, got ", dtype);
  check_vector(a_mem, "a_mem", dtype);
  check_vector(b_mem, "b_mem", dtype);
  check_input(c, "c", at::kFloat);
  TORCH_CHECK(c.dim() == 2 && c.size(0) == 16 && c.size(1) == 16, "c must be (16, 16), got ", c.sizes());
  TORCH_CHECK(ld >= 16 && ld <= 1024, "ld must be in [16, 1024], got ", ld);
  TORCH_CHECK(a_offset >= 0 && a_offset < 64, "a_offset must be in [0, 64), got ", a_offset);
  TORCH_CHECK(a_mem.numel() >= a_offset + 15 * ld + 16, "a_mem must hold a_offset + 15 * ld + 16 = ",
              a_offset + 15 * ld + 16, " elements, got ", a_mem.numel());
  TORCH_CHECK(b_mem.numel() >= 15 * ld + 16, "b_mem must hold 15 * ld + 16 = ", 15 * ld + 16, " elements, got ",
              b_mem.numel());
  at::Tensor d = at::empty({16, 16}, c.options());
  at::Tensor frags = at::empty({3, 32, 8}, c.options());
  if (dtype == at::kHalf) {
    wmma_tile(reinterpret_cast<const __half*>(a_mem.data_ptr<at::Half>()) + a_offset,
              reinterpret_cast<const __half*>(b_mem.data_ptr<at::Half>()), c.data_ptr<float>(), d.data_ptr<float>(),
              frags.data_ptr<float>(), a_col_major, b_col_major, static_cast<int>(ld), nullptr);
  } else {
    wmma_tile(reinterpret_cast<const __nv_bfloat16*>(a_mem.data_ptr<at::BFloat16>()) + a_offset,
              reinterpret_cast<const __nv_bfloat16*>(b_mem.data_ptr<at::BFloat16>()), c.data_ptr<float>(),
              d.data_ptr<float>(), frags.data_ptr<float>(), a_col_major, b_col_major, static_cast<int>(ld), nullptr);
  }
  return {d, frags[0], frags[1], frags[2]};
}

}  // namespace
}  // namespace varcore::simt_selftest

TORCH_LIBRARY_FRAGMENT(varcore_simt, m) {
  m.def("selftest_block_sum(Tensor x, int threads) -> Tensor");
  m.def("selftest_block_sum_racy(Tensor x, int threads) -> Tensor");
  m.def("selftest_block_sum_early_exit(Tensor x, int threads, int active) -> Tensor");
  m.def("selftest_warp_sum(Tensor x, int threads) -> Tensor");
  m.def("selftest_warp_scan(Tensor x, int threads, int width) -> (Tensor, Tensor)");
  m.def("selftest_histogram(Tensor x, int bins, int threads=256, int blocks=8) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("selftest_atomics(int n, int threads) -> Tensor[]");
  m.def("selftest_transpose(Tensor x) -> Tensor");
  m.def("selftest_dynamic_smem(Tensor x, int threads, int pad_bytes=0) -> Tensor");
  m.def("selftest_ballot(Tensor pred, int threads) -> (Tensor, Tensor, Tensor)");
  m.def("selftest_half(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def("selftest_math(Tensor x) -> (Tensor, Tensor)");
  m.def("selftest_divergent_barrier(Tensor x, int threads) -> Tensor");
  m.def("selftest_warp_misuse(int mode) -> Tensor");
  m.def("selftest_shuffle_modes(int arg, int width, int exit_lane=-1) -> Tensor");
  m.def("selftest_wmma(Tensor a_mem, Tensor b_mem, Tensor c, bool a_col_major, bool b_col_major, int ld, "
        "int a_offset=0) -> Tensor[]");
  m.def("selftest_launch(int gx, int gy, int gz, int bx, int by, int bz, int smem=0, bool opt_in=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(varcore_simt, CPU, m) {
  using namespace varcore::simt_selftest;
  m.impl("selftest_block_sum", &selftest_block_sum);
  m.impl("selftest_block_sum_racy", &selftest_block_sum_racy);
  m.impl("selftest_block_sum_early_exit", &selftest_block_sum_early_exit);
  m.impl("selftest_warp_sum", &selftest_warp_sum);
  m.impl("selftest_warp_scan", &selftest_warp_scan);
  m.impl("selftest_histogram", &selftest_histogram);
  m.impl("selftest_transpose", &selftest_transpose);
  m.impl("selftest_dynamic_smem", &selftest_dynamic_smem);
  m.impl("selftest_ballot", &selftest_ballot);
  m.impl("selftest_half", &selftest_half);
  m.impl("selftest_math", &selftest_math);
  m.impl("selftest_divergent_barrier", &selftest_divergent_barrier);
  m.impl("selftest_wmma", &selftest_wmma);
}

// Ops without tensor arguments have no backend to dispatch on.
TORCH_LIBRARY_IMPL(varcore_simt, CompositeExplicitAutograd, m) {
  using namespace varcore::simt_selftest;
  m.impl("selftest_atomics", &selftest_atomics);
  m.impl("selftest_warp_misuse", &selftest_warp_misuse);
  m.impl("selftest_shuffle_modes", &selftest_shuffle_modes);
  m.impl("selftest_launch", &selftest_launch);
}
