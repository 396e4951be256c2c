// The CPU attention kernel's tile buffers and tile matmuls (attention_cpu.cpp), and the
// function multi-versioning its hot loops use.
#pragma once

#include "../attention_math.h"
#include "../entmax_ops.h"
#include "vector_math.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace entmax_cuda {
namespace {

using namespace entmax_cuda::attention;
using math::BackwardSums;
using math::accumulate_backward_entry;
using math::alpha_gradient;
using math::backward_q;
using math::widen;

// The hot loops, compiled for AVX-512, AVX2 and baseline x86-64; the CPU picks
// at load time (GCC function multi-versioning), as in entmax_cpu.cpp.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ATTENTION_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define ATTENTION_CPU_CLONES
#endif

// ------------------------------------------------------------------ buffers

// 64-byte aligned scratch of one thread (a few tiles), zero-initialised.
template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n) : n_(n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    ENTMAX_CHECK(data_ != nullptr, "entmax attention: out of memory for a ", bytes, "-byte tile buffer");
    std::memset(static_cast<void*>(data_), 0, bytes);
  }
  ~Buffer() { std::free(data_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  T* data() { return data_; }
  T& operator[](int64_t i) { return data_[i]; }
  void zero() { std::memset(static_cast<void*>(data_), 0, static_cast<size_t>(n_) * sizeof(T)); }

 private:
  T* data_;
  int64_t n_;
};

// Rows of the vector loops are padded to whole 64-byte vectors with zeros.
template <typename T>
constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(T));
template <typename T>
int64_t padded_dim(int64_t d) { return (d + kLanes<T> - 1) / kLanes<T> * kLanes<T>; }

// Score columns of key tile kt that hold keys, padded to whole vectors: the columns
// past them are padding (-inf scores, p = 0), so no loop visits them, and the
// converted key tiles hold only these keys.
template <typename T>
int64_t key_tile_cols(int64_t Lk, int64_t kt) { return padded_dim<T>(std::min(kBlockK, Lk - kt * kBlockK)); }

// ------------------------------------------------------------------ matmul

template <typename T>
struct Vec64 {
  typedef T type __attribute__((vector_size(64), aligned(alignof(T))));
};

// C[r][0, N) += sum_k A(r, k) B[k][0, N) for MB rows from m0; A(r, k) = A[r*am + k*ak],
// N a multiple of kLanes<T>. Each C element accumulates over k in order, whatever
// the blocking, so a score is the same number in every pass (and on every CPU).
// NV 64-byte vectors of C per row at a time: MB x NV accumulators must stay in
// registers, so NV = 2 needs AVX-512's 32 registers; with 16 (AVX2: a 64-byte vector
// is two) it spilled every accumulator to the stack, 4x slower than NV = 1.
template <typename T, int MB, int NV>
__attribute__((always_inline)) inline void gemm_rows(T* C, int64_t ldc, const T* A, int64_t am, int64_t ak,
                                                     const T* B, int64_t ldb, int64_t m0, int64_t N, int64_t K) {
  typedef typename Vec64<T>::type V;
  constexpr int64_t W = kLanes<T>;
  for (int64_t n0 = 0; n0 < N; n0 += NV * W) {
    const bool two = NV == 2 && n0 + W < N;
    V acc[MB][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) {
      acc[r][0] = *reinterpret_cast<const V*>(C + (m0 + r) * ldc + n0);
      if (NV == 2) acc[r][NV - 1] = two ? *reinterpret_cast<const V*>(C + (m0 + r) * ldc + n0 + W) : V{};
    }
    for (int64_t k = 0; k < K; ++k) {
      const V b0 = *reinterpret_cast<const V*>(B + k * ldb + n0);
      const V b1 = two ? *reinterpret_cast<const V*>(B + k * ldb + n0 + W) : V{};
#pragma GCC unroll 8
      for (int r = 0; r < MB; ++r) {
        const T a = A[(m0 + r) * am + k * ak];
        acc[r][0] += a * b0;
        if (NV == 2) acc[r][NV - 1] += a * b1;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) {
      *reinterpret_cast<V*>(C + (m0 + r) * ldc + n0) = acc[r][0];
      if (two) *reinterpret_cast<V*>(C + (m0 + r) * ldc + n0 + W) = acc[r][NV - 1];
    }
  }
}

// Whether this CPU has AVX-512's 32 vector registers (checked once).
inline bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

template <typename T, int NV>
__attribute__((always_inline)) inline void gemm_acc_blocked(T* C, int64_t ldc, const T* A, int64_t am, int64_t ak,
                                                            const T* B, int64_t ldb, int64_t M, int64_t N,
                                                            int64_t K) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) gemm_rows<T, 4, NV>(C, ldc, A, am, ak, B, ldb, m0, N, K);
  for (; m0 < M; ++m0) gemm_rows<T, 1, NV>(C, ldc, A, am, ak, B, ldb, m0, N, K);
}

template <typename T>
ATTENTION_CPU_CLONES void gemm_acc(T* C, int64_t ldc, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb,
                                   int64_t M, int64_t N, int64_t K) {
  if (cpu_has_avx512()) gemm_acc_blocked<T, 2>(C, ldc, A, am, ak, B, ldb, M, N, K);
  else gemm_acc_blocked<T, 1>(C, ldc, A, am, ak, B, ldb, M, N, K);
}

// C = A B (C zeroed first).
template <typename T>
void gemm(T* C, int64_t ldc, const T* A, int64_t am, int64_t ak, const T* B, int64_t ldb, int64_t M, int64_t N,
          int64_t K) {
  for (int64_t r = 0; r < M; ++r) std::memset(static_cast<void*>(C + r * ldc), 0, sizeof(T) * N);
  gemm_acc(C, ldc, A, am, ak, B, ldb, M, N, K);
}

}  // namespace
}  // namespace entmax_cuda
