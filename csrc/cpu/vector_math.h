// Branch-free float32 exp and log that compilers vectorise (the CPU hot loops
// call them on arrays). Cephes' single-precision polynomials: about 1 ulp.
// Host only; the CUDA kernels use the device's own functions.
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

// log1p(a) for a > -1: log(1 + a) with the rounding of 1 + a corrected
// (so that tiny a keep their digits), given z = 1 + a and inv_z = 1 / z.
inline float log1p_f32(float a, float z, float inv_z) {
  return log_f32(z) - ((z - 1.0f) - a) * inv_z;
}

inline float log1p_f32(float a) {
  const float z1 = 1.0f + a;
  const float z = z1 < kMinNormal ? kMinNormal : z1;
  return log1p_f32(a, z, 1.0f / z);
}

// e = expm1(x) and z = exp(x) for x <= 88, each without cancellation (the contract of
// math::LibMath::expm1_exp): e from its Taylor series where |x| < 0.5, exp(x) - 1
// elsewhere; z = 1 + e above -ln 2, exp(x) below.
inline void expm1_exp_f32(float x, float& e, float& z) {
  float y = 1.0f / 40320;
  y = y * x + 1.0f / 5040;
  y = y * x + 1.0f / 720;
  y = y * x + 1.0f / 120;
  y = y * x + 1.0f / 24;
  y = y * x + 1.0f / 6;
  y = y * x + 0.5f;
  y = y * x * x + x;
  const float ex = exp_f32(x);
  const bool small = x > -0.5f && x < 0.5f;
  e = small ? y : ex - 1.0f;
  z = x > -0.693147181f ? 1.0f + e : ex;
}

inline float expm1_f32(float x) {
  float e, z;
  expm1_exp_f32(x, e, z);
  return e;
}

// The math policy of entmax_math.h's formulas for the float vector loops.
struct VectorMath {
  static float log(float x) { return log_f32(x); }
  static float log1p(float x) { return log1p_f32(x); }
  static float log1p(float a, float z, float inv_z) { return log1p_f32(a, z, inv_z); }
  static float exp(float x) { return exp_f32(x); }
  static float expm1(float x) { return expm1_f32(x); }
  static void expm1_exp(float x, float& e, float& z) { expm1_exp_f32(x, e, z); }
};

}  // namespace vmath
}  // namespace entmax_cuda
