// __half and __nv_bfloat16 for the host emulation of CUDA: storage types with the conversions of cuda_fp16.h and
// cuda_bf16.h (round to nearest even; NaN becomes 0x7fff as on the GPU) and arithmetic through float, which
// rounds exactly like the GPU's 16-bit instructions. Include simt.h, not this file.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>

namespace varcore::simt::detail {

// Rounds v to nearest even in a binary format with kMant stored mantissa bits and kExp exponent bits.
template <int kMant, int kExp>
unsigned short round_to_narrow(double v) {
  constexpr int kBias = (1 << (kExp - 1)) - 1;
  constexpr int kMinExp = 1 - kBias;  // exponent of the smallest normal number
  constexpr unsigned kInf = ((1u << kExp) - 1) << kMant;
  const unsigned sign = std::signbit(v) ? 0x8000u : 0u;
  if (std::isnan(v)) return 0x7fff;
  const double a = std::fabs(v);
  if (std::isinf(a)) return static_cast<unsigned short>(sign | kInf);
  if (a == 0.0) return static_cast<unsigned short>(sign);
  int e = 0;
  std::frexp(a, &e);  // a = m * 2^e with m in [0.5, 1)
  int exp = e - 1 < kMinExp ? kMinExp : e - 1;  // subnormals share the smallest normal exponent
  // In units of the result's last place; the scaling is exact and nearbyint rounds half to even.
  double q = std::nearbyint(std::ldexp(a, kMant - exp));
  if (q == std::ldexp(1.0, kMant + 1)) {  // rounded up into the next binade
    q /= 2;
    ++exp;
  }
  if (exp > kBias) return static_cast<unsigned short>(sign | kInf);
  const unsigned mant = static_cast<unsigned>(q);
  // A subnormal has no implicit bit (exponent field 0); one that rounded up to 2^kMant is the smallest normal.
  const unsigned bits =
      mant < (1u << kMant) ? mant : (static_cast<unsigned>(exp + kBias) << kMant) | (mant - (1u << kMant));
  return static_cast<unsigned short>(sign | bits);
}

template <int kMant, int kExp>
float widen_narrow(unsigned short h) {
  constexpr int kBias = (1 << (kExp - 1)) - 1;
  const unsigned exp = (h >> kMant) & ((1u << kExp) - 1);
  const unsigned mant = h & ((1u << kMant) - 1);
  float mag;
  if (exp == (1u << kExp) - 1) {
    mag = mant != 0 ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else if (exp == 0) {
    mag = std::ldexp(static_cast<float>(mant), 1 - kBias - kMant);
  } else {
    mag = std::ldexp(static_cast<float>(mant | (1u << kMant)), static_cast<int>(exp) - kBias - kMant);
  }
  return (h & 0x8000u) ? -mag : mag;
}

// A 16-bit floating-point type: __half is Narrow<10, 5>, __nv_bfloat16 is Narrow<7, 8>.
template <int kMant, int kExp>
class Narrow {
 public:
  Narrow() = default;
  Narrow(float f) : bits_(round_to_narrow<kMant, kExp>(f)) {}
  Narrow(double d) : bits_(round_to_narrow<kMant, kExp>(d)) {}
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  Narrow(I i) : bits_(round_to_narrow<kMant, kExp>(static_cast<double>(i))) {}
  operator float() const { return widen_narrow<kMant, kExp>(bits_); }

  Narrow& operator+=(Narrow o) { return *this = Narrow(float(*this) + float(o)); }
  Narrow& operator-=(Narrow o) { return *this = Narrow(float(*this) - float(o)); }
  Narrow& operator*=(Narrow o) { return *this = Narrow(float(*this) * float(o)); }
  Narrow& operator/=(Narrow o) { return *this = Narrow(float(*this) / float(o)); }

  friend Narrow operator+(Narrow a, Narrow b) { return Narrow(float(a) + float(b)); }
  friend Narrow operator-(Narrow a, Narrow b) { return Narrow(float(a) - float(b)); }
  friend Narrow operator*(Narrow a, Narrow b) { return Narrow(float(a) * float(b)); }
  friend Narrow operator/(Narrow a, Narrow b) { return Narrow(float(a) / float(b)); }
  friend Narrow operator-(Narrow a) { return from_bits(a.bits_ ^ 0x8000u); }
  friend Narrow operator+(Narrow a) { return a; }
  friend bool operator==(Narrow a, Narrow b) { return float(a) == float(b); }
  friend bool operator!=(Narrow a, Narrow b) { return float(a) != float(b); }
  friend bool operator<(Narrow a, Narrow b) { return float(a) < float(b); }
  friend bool operator>(Narrow a, Narrow b) { return float(a) > float(b); }
  friend bool operator<=(Narrow a, Narrow b) { return float(a) <= float(b); }
  friend bool operator>=(Narrow a, Narrow b) { return float(a) >= float(b); }

  static Narrow from_bits(unsigned bits) {
    Narrow n;
    n.bits_ = static_cast<unsigned short>(bits);
    return n;
  }
  unsigned short bits() const { return bits_; }

 private:
  unsigned short bits_;
};

}  // namespace varcore::simt::detail

using __half = varcore::simt::detail::Narrow<10, 5>;
using __nv_bfloat16 = varcore::simt::detail::Narrow<7, 8>;
using half = __half;
using nv_bfloat16 = __nv_bfloat16;

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double d) { return __half(d); }
inline unsigned short __half_as_ushort(__half h) { return h.bits(); }
inline __half __ushort_as_half(unsigned short u) { return __half::from_bits(u); }

inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits(); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16::from_bits(u); }
