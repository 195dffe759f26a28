// Host emulation of the WMMA API (nvcuda::wmma, CUDA's <mma.h>) for 16x16x16 tiles of __half or __nv_bfloat16
// with float accumulators: what varcore's kernels use to reach tensor cores (csrc/common/mma.h). With it the
// emulated kernels run the branch a GPU runs, fragments included. Include simt.h first (as mma.h does).
//
// Fragments hold their elements per lane, in the register layout the PTX ISA documents for mma.m16n8k16 (a
// 16x16 tile is two n8 halves side by side for matrix_b and the accumulator). With g = lane / 4, t = lane % 4:
//   matrix_a  (16 x 16, m x k), x[0..7]: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1), then the same at columns +8
//   matrix_b  (16 x 16, k x n), x[4h..4h+3]: (2t, 8h+g), (2t+1, 8h+g), (2t+8, 8h+g), (2t+9, 8h+g)
//   accumulator (16 x 16 float), x[4h..4h+3]: (g, 8h+2t), (g, 8h+2t+1), (g+8, 8h+2t), (g+8, 8h+2t+1)
// WMMA leaves this mapping unspecified: code must not depend on it (a kernel that reads x[] as if it were a row
// gets wrong results here, as it may on a GPU). load_matrix_sync reads the memory when it is called (a later
// change of that memory does not reach the fragment), and mma_sync is warp-collective: the lanes exchange their
// elements through per-warp storage between two __syncwarp()s, so a lane that skips a call deadlocks the launch
// (the emulator reports it) instead of passing silently. Products are exact in float and summed over k in order,
// starting from c; tensor cores may sum in another order, so results can differ in the last bits.
//
// As on a GPU: pointers must be 32-byte aligned and ldm a multiple of 16 bytes (8 elements of 16 bits, 4 floats);
// a violation throws std::runtime_error (the launch fails with a message naming the call).
#pragma once

#ifndef VARCORE_SIMT
#error "simt_wmma.h is part of the host emulation of CUDA (see simt.h)"
#endif

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the WMMA emulation covers 16x16x16 tiles");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float>
                                                 : std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "the WMMA emulation covers __half and __nv_bfloat16 inputs with float accumulators");
  static constexpr int num_elements = 8;
  T x[num_elements];
};

namespace detail {

inline int lane() {
  return static_cast<int>((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32);
}

inline int warp() {
  return static_cast<int>((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) / 32);
}

// (row, column) in the 16x16 tile of element i of this lane's fragment, by the mapping in the header comment.
inline void position(matrix_a, int lane, int i, int& r, int& c) {
  const int g = lane / 4, t = lane % 4;
  r = g + 8 * ((i / 2) % 2);
  c = 2 * t + i % 2 + 8 * (i / 4);
}
inline void position(matrix_b, int lane, int i, int& r, int& c) {
  const int g = lane / 4, t = lane % 4, j = i % 4;
  r = 2 * t + j % 2 + 8 * (j / 2);
  c = 8 * (i / 4) + g;
}
inline void position(accumulator, int lane, int i, int& r, int& c) {
  const int g = lane / 4, t = lane % 4, j = i % 4;
  r = g + 8 * (j / 2);
  c = 8 * (i / 4) + 2 * t + j % 2;
}

template <class T>
void check_pointer(const T* p, unsigned ldm, const char* call) {
  const unsigned multiple = 16 / sizeof(T);
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
    throw std::runtime_error(std::string(call) + ": the pointer must be 32-byte aligned (WMMA rule)");
  }
  if (ldm == 0 || ldm % multiple != 0) {
    throw std::runtime_error(std::string(call) + ": ldm must be a positive multiple of " + std::to_string(multiple) +
                             " elements (16 bytes, WMMA rule), got " + std::to_string(ldm));
  }
}

inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

inline std::size_t offset(int r, int c, unsigned ldm, bool row_major) {
  return row_major ? static_cast<std::size_t>(r) * ldm + c : static_cast<std::size_t>(c) * ldm + r;
}

}  // namespace detail

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator is loaded with a layout_t");
  detail::check_pointer(p, ldm, "wmma::load_matrix_sync");
  const int lane = detail::lane();
  for (int i = 0; i < 8; ++i) {
    int r, c;
    detail::position(Use{}, lane, i, r, c);
    f.x[i] = p[detail::offset(r, c, ldm, std::is_same_v<Layout, row_major>)];
  }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::check_pointer(p, ldm, "wmma::load_matrix_sync");
  const int lane = detail::lane();
  for (int i = 0; i < 8; ++i) {
    int r, c;
    detail::position(accumulator{}, lane, i, r, c);
    f.x[i] = p[detail::offset(r, c, ldm, layout == mem_row_major)];
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_pointer(p, ldm, "wmma::store_matrix_sync");
  const int lane = detail::lane();
  for (int i = 0; i < 8; ++i) {
    int r, c;
    detail::position(accumulator{}, lane, i, r, c);
    p[detail::offset(r, c, ldm, layout == mem_row_major)] = f.x[i];
  }
}

template <class Use, class T, class Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T v) {
  for (int i = 0; i < 8; ++i) f.x[i] = v;
}

// d = a * b + c, warp-collective (see the header comment). d may be c.
template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  // per warp: the A, B and C tiles as float, row-major
  static thread_local float tiles[32][3][256];
  float(&tile)[3][256] = tiles[detail::warp()];
  const int lane = detail::lane();
  for (int i = 0; i < 8; ++i) {
    int r, col;
    detail::position(matrix_a{}, lane, i, r, col);
    tile[0][r * 16 + col] = detail::to_float(a.x[i]);
    detail::position(matrix_b{}, lane, i, r, col);
    tile[1][r * 16 + col] = detail::to_float(b.x[i]);
    detail::position(accumulator{}, lane, i, r, col);
    tile[2][r * 16 + col] = c.x[i];
  }
  __syncwarp();
  float out[8];
  for (int i = 0; i < 8; ++i) {
    int r, col;
    detail::position(accumulator{}, lane, i, r, col);
    float s = tile[2][r * 16 + col];
    for (int k = 0; k < 16; ++k) s = fmaf(tile[0][r * 16 + k], tile[1][k * 16 + col], s);
    out[i] = s;
  }
  __syncwarp();  // every lane has read the tiles before any lane's next call writes them
  for (int i = 0; i < 8; ++i) d.x[i] = out[i];
}

}  // namespace nvcuda::wmma
