// Branch-free float32 exp, log and their base-2 forms that compilers vectorise (the CPU
// hot loops call them on arrays): Cephes' single-precision exp and log (about 1 ulp), and
// leaner exp2 / log2 on minimax polynomials for the per-entry terms (accuracy stated with
// each). Host only; the CUDA kernels use the device's own functions.
#pragma once

#include <cstdint>

namespace entmax_cuda {
namespace vmath {

inline float bits_to_float(uint32_t b) { return __builtin_bit_cast(float, b); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

constexpr float kMinNormal = 1.17549435e-38f;

// exp(x) for x <= 88; 0 below -87.3 (where float32 would go subnormal).
inline float exp_f32(float x_in) {
  const float lo = x_in < -87.3f ? -87.3f : x_in;
  const float x = lo > 88.3f ? 88.3f : lo;
  // round to nearest by adding 1.5 * 2^23: vectorises on every x86-64 (no roundps needed)
  const float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t k = static_cast<int32_t>(fx);
  const float scale = bits_to_float(static_cast<uint32_t>(k + 127) << 23);
  const float result = y * scale;
  return x_in < -87.3f ? 0.0f : result;
}

// log(x) for x > 0; a subnormal x is scaled into the normal range first.
inline float log_f32(float x_in) {
  const bool tiny = x_in < kMinNormal;
  const float x = tiny ? x_in * 8388608.0f : x_in;  // * 2^23
  const uint32_t bits = float_to_bits(x);
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float ef = static_cast<float>(e);
  y += ef * -2.12194440e-4f;
  y += -0.5f * z;
  const float result = f + y + ef * 0.693359375f;
  return tiny ? result - 15.9423851528787421f : result;  // undo the scaling: - 23 ln 2
}

// log1p(a) for a > -1: log(1 + a) with the rounding of 1 + a corrected (so that tiny a
// keep their digits). The fused attention's CPU tiles use it.
inline float log1p_f32(float a) {
  const float z1 = 1.0f + a;
  const float z = z1 < kMinNormal ? kMinNormal : z1;
  return log_f32(z) - ((z - 1.0f) - a) / z;
}

// expm1(x) for x <= 88: its Taylor series where |x| < 1/2 (about 1 ulp), exp(x) - 1
// elsewhere (no cancellation there).
inline float expm1_f32(float x) {
  float y = 1.0f / 40320;
  y = y * x + 1.0f / 5040;
  y = y * x + 1.0f / 720;
  y = y * x + 1.0f / 120;
  y = y * x + 1.0f / 24;
  y = y * x + 1.0f / 6;
  y = y * x + 0.5f;
  y = y * x * x + x;
  return x > -0.5f && x < 0.5f ? y : exp_f32(x) - 1.0f;
}

// 2^x for x <= 0 (0 below -125, where float32 goes subnormal). 2^r on [-1/2, 1/2] by a
// degree-6 minimax polynomial (1.6e-8 relative with float32 coefficients), evaluated in
// Estrin's scheme: a short dependency chain keeps more entries in flight.
inline float exp2_f32(float x_in) {
  const float x = x_in < -125.0f ? -125.0f : x_in;
  const float shifted = x + 12582912.0f;  // 1.5 * 2^23: k = round(x) lands in the low mantissa bits
  const float r = x - (shifted - 12582912.0f);  // exact, in [-1/2, 1/2]
  const float r2 = r * r;  // 2^r = 1 + r Q(r): the 1 added last, in one rounding
  const float q01 = 2.402264625e-1f * r + 6.931471825e-1f, q23 = 9.618489072e-3f * r + 5.550328642e-2f;
  const float q45 = 1.534581243e-4f * r + 1.339993090e-3f;
  const float y = ((q45 * r2 + q23) * r2 + q01) * r + 1.0f;
  const float scale = bits_to_float((float_to_bits(shifted) - 0x4b400000u + 127u) << 23);  // 2^k
  return x_in < -125.0f ? 0.0f : y * scale;
}

// P(f) = log2(1 + f) / f for f in [sqrt(1/2) - 1, sqrt(2) - 1]: degree-8 minimax, 4.4e-8
// relative with float32 coefficients, in Estrin's scheme (a short dependency chain keeps
// more entries in flight) with the constant term added last.
inline float log2_1p_poly(float f) {
  const float f2 = f * f, f4 = f2 * f2;
  const float r01 = 4.809106290e-1f * f - 7.213473320e-1f, r23 = 2.879162431e-1f * f - 3.607036769e-1f;
  const float r45 = 2.157156467e-1f * f - 2.389448285e-1f, r67 = 1.258369386e-1f * f - 2.072697580e-1f;
  const float r = (r67 * f2 + r45) * f4 + (r23 * f2 + r01);
  return r * f + 1.442695022e+0f;
}

// log2(1 + a) for -1 < a <= 0, given z = 1 + a as rounded (z >= 2^-24: normal). With
// z = 2^k m, m in [sqrt(1/2), sqrt(2)): log2(1 + a) = k + f P(f), f = 2^-k (1 + a) - 1,
// formed exactly as fma(2^-k, a, 2^-k - 1) (the result is representable: a itself for
// k = 0, 1 + 2a for k = -1 by Sterbenz, and m - 1 below, where 1 + a does not round), so
// the rounding of z costs nothing and needs no correction term.
inline float log2_1p_f32(float a, float z) {
  const uint32_t offset = float_to_bits(z) - 0x3f3504f3u;  // bits of sqrt(1/2)
  const int32_t k = static_cast<int32_t>(offset) >> 23;
  const float s = bits_to_float(static_cast<uint32_t>(127 - k) << 23);  // 2^-k
  const float f = s * a + (s - 1.0f);
  return log2_1p_poly(f) * f + static_cast<float>(k);
}

// log2(x) for x > 0 (a subnormal x is scaled into the normal range first): the range
// reduction of log2_1p_f32 with f = m - 1 (exact), and its polynomial.
inline float log2_f32(float x_in) {
  const bool tiny = x_in < kMinNormal;
  const float x = tiny ? x_in * 8388608.0f : x_in;  // * 2^23
  const uint32_t offset = float_to_bits(x) - 0x3f3504f3u;  // bits of sqrt(1/2)
  const int32_t k = static_cast<int32_t>(offset) >> 23;
  const float f = bits_to_float((offset & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  return log2_1p_poly(f) * f + (static_cast<float>(k) - (tiny ? 23.0f : 0.0f));
}

// (1 + a)^inv_eps for -1 < a <= 0 (an entry's p at its threshold), given z = 1 + a.
inline float pow1p_f32(float a, float z, float inv_eps) { return exp2_f32(log2_1p_f32(a, z) * inv_eps); }

// The math policy of entmax_math.h's formulas for the float vector loops.
struct VectorMath {
  static float log(float x) { return log_f32(x); }
  static float log2(float x) { return log2_f32(x); }
  static float exp(float x) { return exp_f32(x); }
  static float exp2(float x) { return exp2_f32(x); }
  static float expm1(float x) { return expm1_f32(x); }
  static float expm1(float /*x*/, float z) { return z - 1.0f; }  // for |x| >= series_limit (1)
  static float pow1p(float a, float z, float inv_eps) { return pow1p_f32(a, z, inv_eps); }
};

}  // namespace vmath
}  // namespace entmax_cuda
