// Tile matmuls of the fused attention kernels (docs/attention.md, "CUDA"), two
// policies with one interface, so that the attention kernels are written once:
//
//   SimtGemm<scalar_t>      every dtype; CUDA cores, accumulation in acc_t
//                           (float, double for double), operands streamed from
//                           global memory through shared memory in 16-wide chunks.
//   TcGemm<scalar_t, kChunk> half / bfloat16; mma.sync m16n8k16 (two m16n8k8 on
//                           sm_75, float16 only) fed by ldmatrix, operand tiles held
//                           whole in shared memory.
//
// A CTA is 4 warps; it owns a 64-row tile, warp w rows [16w, 16w + 16). Every
// product leaves its result in the mma.sync accumulator layout (FragCoord), the
// one layout the kernels' row logic reads, for both policies:
//   xy_t<X, Y>(acc, ...)   acc[nt][e] = (X Y^T)(row, col) over the slots' common width,
//                          X and Y 64-row tiles (rows of X: the CTA's rows; rows of
//                          Y: the result's 64 columns), times both slots' scales;
//   a_y<Y>(acc, a, c0, ..) acc[nt][e] += (A (scale_Y Y)[:, c0 : c0 + kChunk])(row, col),
//                          A a 64 x 64 fragment in registers, Y's 64 rows the
//                          contraction.
// Slots: 0 and 1 resident (the CTA's own rows), 2 and 3 streamed (reloaded per
// block). load<S>() fills a slot (TC: shared memory; SIMT: remembers the source);
// callers bracket loads with __syncthreads(). Both products must be called by all
// threads of the CTA (SIMT synchronises inside); `active` only gates the arithmetic
// of the calling warp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace entmax_cuda {
namespace attention_cuda {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;            // rows of a CTA's tile, and keys per block
constexpr int kTileNt = kTile / 8;   // m16n8 n-tiles across a 64-wide result
constexpr int kSlots = 4;
constexpr unsigned kFullMask = 0xffffffffu;

// ------------------------------------------------------------------ scalar types

template <typename T> struct Scalar;
template <> struct Scalar<float> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(float x) { return x; }
  static __device__ __forceinline__ float from_acc(float x) { return x; }
};
template <> struct Scalar<double> {
  using acc = double;
  static __device__ __forceinline__ double to_acc(double x) { return x; }
  static __device__ __forceinline__ double from_acc(double x) { return x; }
};
template <> struct Scalar<__half> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_acc(float x) { return __float2half_rn(x); }
};
template <> struct Scalar<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
};

// ------------------------------------------------------------------ layout

// The thread's place in the m16n8 accumulator layout of a 64-row result:
// element acc[nt][e] sits at row(e >> 1), column col(nt, e).
struct FragCoord {
  int warp, lane, g, tq;
  __device__ __forceinline__ FragCoord()
      : warp(threadIdx.x >> 5), lane(threadIdx.x & 31), g((threadIdx.x & 31) >> 2), tq(threadIdx.x & 3) {}
  __device__ __forceinline__ int row(int half) const { return 16 * warp + g + 8 * half; }
  __device__ __forceinline__ int col(int nt, int e) const { return 8 * nt + 2 * tq + (e & 1); }
};

template <typename T, int NT>
struct Frag {
  T v[NT][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) v[n][e] = T(0);
  }
};

// The four lanes of a quad share a row: sums and maxima over them, the same
// bits in every lane (the butterfly adds commuting pairs).
template <typename T>
__device__ __forceinline__ T quad_sum(T x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  x += __shfl_xor_sync(kFullMask, x, 2);
  return x;
}

// A 64-row tile of a (B, H, L, E) tensor: rows [0, rows) and columns [0, cols)
// exist, the rest reads as zero.
template <typename scalar_t>
struct TileSrc {
  const scalar_t* base;  // element (row 0, column 0)
  int64_t rs, cs;        // row and column strides
  int rows, cols;
  bool vec16;            // cs == 1 and every row start 16-byte aligned (TC: 16-byte loads)
};

// What a kernel keeps in each slot: the columns it loads (0: unused) and whether
// a_y reads the slot (its width then rounds up to whole chunks).
struct SlotDims {
  int cols[kSlots];
  bool a_y[kSlots];
};

__host__ __device__ __forceinline__ int round_up(int x, int m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------------ SIMT

template <typename scalar_t>
struct SimtGemm {
  using acc_t = typename Scalar<scalar_t>::acc;
  using scalar = scalar_t;
  static constexpr int kChunk = 64;  // columns of an a_y result
  static constexpr int kK = 16;      // contraction chunk staged in shared memory
  static constexpr int kLdA = kK + 1, kLdB = kTile + 1, kLdP = kTile + 1;
  static constexpr bool kTensorCores = false;

  struct Slot {
    TileSrc<scalar_t> src;
    acc_t scale;
    int col0;
  };
  acc_t* sA;  // [64][kLdA]: X's chunk
  acc_t* sB;  // [kK][kLdB]: Y's chunk, transposed
  acc_t* sP;  // [64][kLdP]: a_y's A operand
  Slot slot[kSlots];

  static __host__ __device__ size_t smem_bytes(const SlotDims&) {
    return (static_cast<size_t>(kTile) * kLdA + kK * kLdB + kTile * kLdP) * sizeof(acc_t);
  }

  __device__ __forceinline__ SimtGemm(unsigned char* smem, const SlotDims&) {
    sA = reinterpret_cast<acc_t*>(smem);
    sB = sA + kTile * kLdA;
    sP = sB + kK * kLdB;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) slot[s] = Slot{TileSrc<scalar_t>{nullptr, 0, 0, 0, 0, false}, acc_t(0), 0};
  }

  // Columns [col0, col0 + cols) of src; SIMT reads them from global memory in the products.
  template <int S>
  __device__ __forceinline__ void load(const TileSrc<scalar_t>& src, acc_t scale, int col0 = 0) {
    slot[S].src = src;
    slot[S].scale = scale;
    slot[S].col0 = col0;
  }

  static __device__ __forceinline__ acc_t read(const Slot& s, int r, int c) {
    const int cc = s.col0 + c;
    return (r < s.src.rows && cc < s.src.cols)
               ? Scalar<scalar_t>::to_acc(s.src.base[r * s.src.rs + cc * s.src.cs]) * s.scale
               : acc_t(0);
  }

  template <int SX, int SY>
  __device__ __forceinline__ void xy_t(Frag<acc_t, kTileNt>& acc, bool active) {
    const FragCoord fc;
    const Slot& X = slot[SX];
    const Slot& Y = slot[SY];
    const int width = X.src.cols < Y.src.cols ? X.src.cols : Y.src.cols;
    acc.zero();
    for (int k0 = 0; k0 < width; k0 += kK) {
      __syncthreads();
      for (int f = threadIdx.x; f < kTile * kK; f += kThreads) {
        const int r = f / kK, kk = f % kK;
        sA[r * kLdA + kk] = read(X, r, k0 + kk);
        sB[kk * kLdB + r] = read(Y, r, k0 + kk);
      }
      __syncthreads();
      if (!active) continue;
      const int kn = width - k0 < kK ? width - k0 : kK;
      for (int kk = 0; kk < kn; ++kk) {
        const acc_t a0 = sA[fc.row(0) * kLdA + kk], a1 = sA[fc.row(1) * kLdA + kk];
#pragma unroll
        for (int nt = 0; nt < kTileNt; ++nt) {
          const acc_t b0 = sB[kk * kLdB + fc.col(nt, 0)], b1 = sB[kk * kLdB + fc.col(nt, 1)];
          acc.v[nt][0] += a0 * b0;
          acc.v[nt][1] += a0 * b1;
          acc.v[nt][2] += a1 * b0;
          acc.v[nt][3] += a1 * b1;
        }
      }
    }
  }

  // scale_rows: see TcGemm::a_y (A stays in acc_t here: nothing to do).
  template <int SY, int NT>
  __device__ __forceinline__ void a_y(Frag<acc_t, NT>& acc, const Frag<acc_t, kTileNt>& a, int c0, bool active,
                                      bool /*scale_rows*/ = false) {
    static_assert(NT * 8 == kChunk, "SIMT a_y produces kChunk columns");
    const FragCoord fc;
    const Slot& Y = slot[SY];
    __syncthreads();  // earlier readers of sP are done
#pragma unroll
    for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) sP[fc.row(e >> 1) * kLdP + fc.col(nt, e)] = a.v[nt][e];
    for (int k0 = 0; k0 < kTile; k0 += kK) {
      __syncthreads();
      for (int f = threadIdx.x; f < kK * kChunk; f += kThreads) {
        const int kk = f / kChunk, c = f % kChunk;
        sB[kk * kLdB + c] = read(Y, k0 + kk, c0 + c);
      }
      __syncthreads();
      if (!active) continue;
#pragma unroll 4
      for (int kk = 0; kk < kK; ++kk) {
        const acc_t a0 = sP[fc.row(0) * kLdP + k0 + kk], a1 = sP[fc.row(1) * kLdP + k0 + kk];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const acc_t b0 = sB[kk * kLdB + fc.col(nt, 0)], b1 = sB[kk * kLdB + fc.col(nt, 1)];
          acc.v[nt][0] += a0 * b0;
          acc.v[nt][1] += a0 * b1;
          acc.v[nt][2] += a1 * b0;
          acc.v[nt][3] += a1 * b1;
        }
      }
    }
  }
};

// ------------------------------------------------------------------ tensor cores

// ENTMAX_CUDA_EMULATION: a host build of these headers for the tests, where
// tests/cuda_emulation/cuda_emulation.h implements the warp instructions on the
// CPU from the PTX ISA's fragment layouts.

// Four 8x8 matrices of 16-bit elements from shared memory; p: this lane's row address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(ENTMAX_CUDA_EMULATION)
  emulation::ldmatrix_x4(r, p, false);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// The same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#if defined(ENTMAX_CUDA_EMULATION)
  emulation::ldmatrix_x4(r, p, true);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// c += a b for one m16n8k8 float16 tile (Turing's shape): a0 rows g, a1 rows g + 8, b0 k 2t, 2t + 1.
__device__ __forceinline__ void mma_1688_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
#if defined(ENTMAX_CUDA_EMULATION)
  emulation::mma_1688_f16(c, a0, a1, b0);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
               "{%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(b0));
#else
  __trap();  // the launcher never selects tensor cores below sm_75
#endif
}

// An m16n8k16 float16 product as two m16n8k8 ones: of the k16 fragments, a[0], a[1] and b0 hold
// k 0..7 and a[2], a[3] and b1 hold k 8..15, each in the k8 shape's layout.
__device__ __forceinline__ void mma_16816_as_two_k8(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_1688_f16(c, a[0], a[1], b0);
  mma_1688_f16(c, a[2], a[3], b1);
}

// c += a b for one m16n8k16 tile, a in the row layout, b in the column layout.
template <typename scalar_t>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(ENTMAX_CUDA_EMULATION)
  if (emulation::turing_mma()) mma_16816_as_two_k8(c, a, b0, b1);
  else emulation::mma_16816(c, a, b0, b1, false);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  mma_16816_as_two_k8(c, a, b0, b1);  // Turing (sm_75) has the k8 shape only
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                          uint32_t b1) {
#if defined(ENTMAX_CUDA_EMULATION)
  emulation::mma_16816(c, a, b0, b1, true);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // bfloat16 mma needs sm_80; the launcher takes the SIMT path below it
#endif
}

template <typename scalar_t>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Whether TcGemm<scalar_t> runs on the device being compiled for (sm_75: float16 only).
template <typename scalar_t>
__host__ __device__ constexpr bool tc_compiled_for_this_arch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return std::is_same<scalar_t, __half>::value && __CUDA_ARCH__ >= 750;
#else
  return true;
#endif
}

template <typename scalar_t, int kChunkCols>
struct TcGemm {
  static_assert(std::is_same<scalar_t, __half>::value || std::is_same<scalar_t, __nv_bfloat16>::value,
                "tensor-core tiles are float16 or bfloat16");
  static_assert(kChunkCols % 16 == 0, "chunks are whole pairs of n-tiles");
  using acc_t = float;
  using scalar = scalar_t;
  static constexpr int kChunk = kChunkCols;
  static constexpr bool kTensorCores = true;
  static constexpr int kPad = 8;  // halves of row padding: rows 16 bytes apart mod 128, ldmatrix conflict-free

  struct Slot {
    scalar_t* smem;
    int ld;     // row stride in elements
    int width;  // columns held (a multiple of 16; zero past the source's columns)
    float scale;
  };
  Slot slot[kSlots];

  static __host__ __device__ int slot_width(const SlotDims& d, int s) {
    return d.cols[s] == 0 ? 0 : round_up(d.cols[s], d.a_y[s] ? kChunk : 16);
  }
  static __host__ __device__ size_t slot_bytes(const SlotDims& d, int s) {
    const int w = slot_width(d, s);
    return w == 0 ? 0 : static_cast<size_t>(kTile) * (w + kPad) * sizeof(scalar_t);
  }
  static __host__ __device__ size_t smem_bytes(const SlotDims& d) {
    size_t n = 0;
    for (int s = 0; s < kSlots; ++s) n += slot_bytes(d, s);
    return n;
  }

  __device__ __forceinline__ TcGemm(unsigned char* smem, const SlotDims& d) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      slot[s].smem = reinterpret_cast<scalar_t*>(smem);
      slot[s].width = slot_width(d, s);
      slot[s].ld = slot[s].width + kPad;
      slot[s].scale = 1.0f;
      smem += slot_bytes(d, s);
    }
  }

  // Columns [col0, col0 + width) of src into the slot, zero past src's rows and columns.
  template <int S>
  __device__ __forceinline__ void load(const TileSrc<scalar_t>& src, float scale, int col0 = 0) {
    Slot& s = slot[S];
    s.scale = scale;
    const int groups = s.width / 8;  // 8 elements = 16 bytes
    for (int f = threadIdx.x; f < kTile * groups; f += kThreads) {
      const int r = f / groups, c = (f % groups) * 8;
      const int cc = col0 + c;
      scalar_t* dst = s.smem + r * s.ld + c;
      if (src.vec16 && r < src.rows && cc + 8 <= src.cols) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src.base + r * src.rs + cc);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e)
          dst[e] = (r < src.rows && cc + e < src.cols) ? src.base[r * src.rs + (cc + e) * src.cs]
                                                        : Scalar<scalar_t>::from_acc(0.0f);
      }
    }
  }

  template <int SX, int SY>
  __device__ __forceinline__ void xy_t(Frag<float, kTileNt>& acc, bool active) {
    acc.zero();
    if (!active) return;
    const FragCoord fc;
    const Slot& X = slot[SX];
    const Slot& Y = slot[SY];
    const int width = X.width < Y.width ? X.width : Y.width;
    const int l = fc.lane;
    // ldmatrix lane addresses: A rows of the warp, k halves by lane / 16; B n rows by lanes 0-7 and
    // 16-23, k halves by (lane / 8) % 2
    const scalar_t* a_ptr = X.smem + (16 * fc.warp + (l & 15)) * X.ld + (l >> 4) * 8;
    const scalar_t* b_ptr = Y.smem + ((l & 7) + ((l >> 4) << 3)) * Y.ld + ((l >> 3) & 1) * 8;
    for (int k0 = 0; k0 < width; k0 += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, a_ptr + k0);
#pragma unroll
      for (int np = 0; np < kTileNt / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, b_ptr + 16 * np * Y.ld + k0);
        mma_16816<scalar_t>(acc.v[2 * np], a, b[0], b[1]);
        mma_16816<scalar_t>(acc.v[2 * np + 1], a, b[2], b[3]);
      }
    }
    const float s = X.scale * Y.scale;
#pragma unroll
    for (int nt = 0; nt < kTileNt; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc.v[nt][e] *= s;
  }

  // scale_rows: A may exceed the half type's range (the backward's dS: its weights p^(2 - alpha)
  // are unbounded at the support's edge for alpha > 2, and float16 overflows at 65520). Each
  // row of A is then packed times a power of two 2^-k that brings its largest entry below 2^15,
  // and the row of acc is scaled by 2^-k before the products and by 2^k after: exact (powers
  // of two), and k = 0 (factors 1, the same bits as without) for every row within range.
  template <int SY, int NT>
  __device__ __forceinline__ void a_y(Frag<float, NT>& acc, const Frag<float, kTileNt>& a, int c0, bool active,
                                      bool scale_rows = false) {
    static_assert(NT * 8 == kChunk, "a_y produces kChunk columns");
    if (!active) return;
    const FragCoord fc;
    const Slot& Y = slot[SY];
    const float s = Y.scale;
    int shift = 0;  // k of row g in bits 0-7, of row g + 8 in bits 8-15 (one register across the products)
    if (scale_rows) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float m = 0.f;  // the row's largest |A s| (rows g and g + 8: elements 2r, 2r + 1), over the quad
#pragma unroll
        for (int nt = 0; nt < kTileNt; ++nt) m = fmaxf(m, fmaxf(fabsf(a.v[nt][2 * r]), fabsf(a.v[nt][2 * r + 1])));
        m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 1));
        m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 2));
        m *= fabsf(s);
        int e = 0;
        if (m < INFINITY) frexpf(m, &e);  // m < 2^e (NaN and inf rows stay as they are)
        shift |= (e > 15 ? e - 15 : 0) << (8 * r);
      }
      if (shift != 0)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc.v[nt][e] = ldexpf(acc.v[nt][e], -((shift >> (4 * (e & 2))) & 255));
    }
    const int l = fc.lane;
    // ldmatrix.trans lane addresses: k rows by lanes (0-7, 8-15) and (16-23, 24-31), n halves by lane / 16
    const scalar_t* b_ptr = Y.smem + ((l & 7) + ((l >> 3) & 1) * 8) * Y.ld + c0 + (l >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t af[4];
      const float s0 = ldexpf(s, -(shift & 255)), s1 = ldexpf(s, -(shift >> 8));  // s when shift = 0
      af[0] = pack2<scalar_t>(a.v[2 * kk][0] * s0, a.v[2 * kk][1] * s0);
      af[1] = pack2<scalar_t>(a.v[2 * kk][2] * s1, a.v[2 * kk][3] * s1);
      af[2] = pack2<scalar_t>(a.v[2 * kk + 1][0] * s0, a.v[2 * kk + 1][1] * s0);
      af[3] = pack2<scalar_t>(a.v[2 * kk + 1][2] * s1, a.v[2 * kk + 1][3] * s1);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, b_ptr + 16 * kk * Y.ld + 16 * np);
        mma_16816<scalar_t>(acc.v[2 * np], af, b[0], b[1]);
        mma_16816<scalar_t>(acc.v[2 * np + 1], af, b[2], b[3]);
      }
    }
    if (shift != 0) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc.v[nt][e] = ldexpf(acc.v[nt][e], (shift >> (4 * (e & 2))) & 255);
    }
  }
};

}  // namespace attention_cuda
}  // namespace entmax_cuda
