// Branch-free float32 exp and log that compilers vectorise (the CPU hot loops
// call them on arrays). Cephes' single-precision polynomials: about 1 ulp.
// Host only; the CUDA kernels use the device's own functions.
#pragma once

#include <cstdint>

namespace entmax_cuda {
namespace vmath {

inline float bits_to_float(uint32_t b) { return __builtin_bit_cast(float, b); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

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

// log(x) for normal x > 0.
inline float log_f32(float x) {
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
  return f + y + ef * 0.693359375f;
}

// log1p(a) for a > -1: log(1 + a) with the rounding of 1 + a corrected
// (so that tiny a keep their digits).
inline float log1p_f32(float a) {
  const float z1 = 1.0f + a;
  const float z = z1 < 1.17549435e-38f ? 1.17549435e-38f : z1;
  return log_f32(z) - ((z - 1.0f) - a) / z;
}

// expm1(x) for x <= 88: Taylor series where |x| < 0.5 (no cancellation), exp(x) - 1 elsewhere.
inline float expm1_f32(float x) {
  float y = 1.0f / 40320;
  y = y * x + 1.0f / 5040;
  y = y * x + 1.0f / 720;
  y = y * x + 1.0f / 120;
  y = y * x + 1.0f / 24;
  y = y * x + 1.0f / 6;
  y = y * x + 0.5f;
  y = y * x * x + x;
  const float big = exp_f32(x) - 1.0f;
  const bool small = x > -0.5f && x < 0.5f;
  return small ? y : big;
}

}  // namespace vmath
}  // namespace entmax_cuda
