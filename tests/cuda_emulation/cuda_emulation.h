// A CPU emulation of the CUDA features the attention kernels use, so that the
// tests run the kernels' own source (csrc/cuda/attention_*.cuh) without a GPU.
//
// One CTA at a time; each thread of it is a fiber (ucontext) on this OS thread,
// switched only inside the collective operations:
//   __syncthreads / __syncthreads_or   wait for every thread of the CTA;
//   __shfl_xor_sync / __any_sync       wait for the 32 lanes of the warp;
//   ldmatrix_x4 / mma_16816 / mma_1688_f16  the warp instructions, from the PTX ISA's
//                                      fragment layouts (ldmatrix: lane l gets row
//                                      l/4, elements 2(l%4) and 2(l%4)+1 of each
//                                      8x8 matrix, or of its transpose with .trans;
//                                      m16n8k16: a0a1 row g, a2a3 row g+8, a4..a7
//                                      the same 8 columns on; b0b1 rows 2t, 2t+1 of
//                                      column g, b2b3 8 rows on; c0c1 row g, c2c3
//                                      row g+8, columns 2t, 2t+1; g = lane/4, t = lane%4).
// Stricter than a GPU where that finds bugs: a collective that not every thread
// (CTA) or lane (warp) reaches is reported as a deadlock; ldmatrix addresses must
// lie in the CTA's shared memory, 16-byte aligned; the full mask is required;
// shared memory starts filled with 0xff bytes (NaN as floats and halves), so a read
// of an unwritten element shows in the results. run_cta's schedule: 0 resumes every
// thread in order each round; any other value seeds random rounds that resume the
// threads in a random order and each warp only with probability 1/2, so that warps
// run ahead of each other (up to the next CTA barrier) as on a GPU: a shared-memory
// race (a missing barrier) then makes results depend on the schedule.
// Include this before the kernel headers, with ENTMAX_CUDA_EMULATION defined.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline EmulatedDim3 threadIdx, blockIdx;  // the running fiber's, set by the scheduler

namespace entmax_cuda {
namespace emulation {

constexpr int kWarpSize = 32;
constexpr int kMaxWarps = 32;
constexpr size_t kStackBytes = 512 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

struct Cta {
  struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    bool done = false;
    char waiting = 0;  // 'C' CTA barrier, 'W' warp collective
  };
  int threads = 0;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  uint64_t progress = 0;  // arrivals and departures at collectives, finished threads
  int arrived = 0;
  uint64_t generation = 0;
  int or_value = 0;
  int or_result[2] = {0, 0};
  int warp_arrived[kMaxWarps] = {};
  uint64_t warp_generation[kMaxWarps] = {};
  unsigned char slots[kMaxWarps][kWarpSize][32];
  std::vector<unsigned char> smem;
  std::function<void()> body;
  std::string error;
};

inline Cta& cta() {
  static Cta c;
  return c;
}

inline unsigned char* dynamic_smem() { return cta().smem.data(); }

inline void yield() {
  Cta& c = cta();
  swapcontext(&c.fibers[c.current].context, &c.scheduler);
}

inline void fail(const std::string& what) { throw std::runtime_error("CUDA emulation: " + what); }

inline int warp_of_thread() { return static_cast<int>(threadIdx.x) / kWarpSize; }
inline int lane() { return static_cast<int>(threadIdx.x) % kWarpSize; }

inline int lanes_in_warp(int w) {
  const int left = cta().threads - w * kWarpSize;
  return left < kWarpSize ? left : kWarpSize;
}

// Every thread of the CTA; returns the OR of their predicates.
inline int cta_barrier(int predicate) {
  Cta& c = cta();
  const uint64_t gen = c.generation;
  ++c.progress;
  c.or_value |= predicate;
  if (++c.arrived == c.threads) {
    c.or_result[gen & 1] = c.or_value;
    c.or_value = 0;
    c.arrived = 0;
    ++c.generation;
  } else {
    c.fibers[c.current].waiting = 'C';
    while (c.generation == gen) yield();
    c.fibers[c.current].waiting = 0;
  }
  ++c.progress;
  return c.or_result[gen & 1];
}

// Every lane of the calling thread's warp.
inline void warp_barrier() {
  Cta& c = cta();
  const int w = warp_of_thread();
  const uint64_t gen = c.warp_generation[w];
  ++c.progress;
  if (++c.warp_arrived[w] == lanes_in_warp(w)) {
    c.warp_arrived[w] = 0;
    ++c.warp_generation[w];
  } else {
    c.fibers[c.current].waiting = 'W';
    while (c.warp_generation[w] == gen) yield();
    c.fibers[c.current].waiting = 0;
  }
  ++c.progress;
}

// Each lane publishes `bytes` of value; after the call every lane's are readable by slot(lane).
inline void publish(const void* value, size_t bytes) {
  if (bytes > sizeof(cta().slots[0][0])) fail("a warp exchange of more than 32 bytes");
  std::memcpy(cta().slots[warp_of_thread()][lane()], value, bytes);
  warp_barrier();
}
inline const unsigned char* slot(int l) { return cta().slots[warp_of_thread()][l]; }

inline void check_full_mask(unsigned mask) {
  if (mask != kFullMask) fail("a warp collective with a partial mask");
}

inline void check_shared(const void* p) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  const Cta& c = cta();
  if (b < c.smem.data() || b + 16 > c.smem.data() + c.smem.size()) fail("ldmatrix address outside shared memory");
  if ((reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(c.smem.data())) % 16 != 0)
    fail("ldmatrix row address not 16-byte aligned");
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  check_shared(p);
  publish(&p, sizeof p);
  const int l = lane(), g = l / 4, t = l % 4;
  for (int j = 0; j < 4; ++j) {
    auto row = [&](int i) {
      const void* a;
      std::memcpy(&a, slot(8 * j + i), sizeof a);
      return static_cast<const uint16_t*>(a);
    };
    const uint16_t lo = trans ? row(2 * t)[g] : row(g)[2 * t];
    const uint16_t hi = trans ? row(2 * t + 1)[g] : row(g)[2 * t + 1];
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  warp_barrier();  // the slots may be reused
}

inline float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t w = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &w, sizeof f);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

// c += A B, A 16x16 and B 16x8 spread over the warp as mma.m16n8k16 .row.col expects.
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  const uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  publish(mine, sizeof mine);
  float A[16][16], B[16][8];
  for (int L = 0; L < kWarpSize; ++L) {
    uint32_t f[6];
    std::memcpy(f, slot(L), sizeof f);
    const int g = L / 4, t = L % 4;
    for (int h = 0; h < 2; ++h) {
      auto half_of = [&](uint32_t reg) { return half_bits_to_float(static_cast<uint16_t>(reg >> (16 * h)), bf16); };
      A[g][2 * t + h] = half_of(f[0]);
      A[g + 8][2 * t + h] = half_of(f[1]);
      A[g][2 * t + 8 + h] = half_of(f[2]);
      A[g + 8][2 * t + 8 + h] = half_of(f[3]);
      B[2 * t + h][g] = half_of(f[4]);
      B[2 * t + 8 + h][g] = half_of(f[5]);
    }
  }
  const int g = lane() / 4, t = lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[e] += sum;
  }
  warp_barrier();
}

// Whether mma_16816 on float16 runs as two m16n8k8 (the kernels' Turing path).
inline bool& turing_mma() {
  static bool on = false;
  return on;
}

// c += A B, A 16x8 and B 8x8 as mma.m16n8k8 .f16 expects: a0 row g, a1 row g + 8, columns
// 2t, 2t + 1; b0 rows 2t, 2t + 1 of column g; c as m16n8k16's.
inline void mma_1688_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  const uint32_t mine[3] = {a0, a1, b0};
  publish(mine, sizeof mine);
  float A[16][8], B[8][8];
  for (int L = 0; L < kWarpSize; ++L) {
    uint32_t f[3];
    std::memcpy(f, slot(L), sizeof f);
    const int g = L / 4, t = L % 4;
    for (int h = 0; h < 2; ++h) {
      auto half_of = [&](uint32_t reg) { return half_bits_to_float(static_cast<uint16_t>(reg >> (16 * h)), false); };
      A[g][2 * t + h] = half_of(f[0]);
      A[g + 8][2 * t + h] = half_of(f[1]);
      B[2 * t + h][g] = half_of(f[2]);
    }
  }
  const int g = lane() / 4, t = lane() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float sum = 0.0f;
    for (int k = 0; k < 8; ++k) sum += A[row][k] * B[k][col];
    c[e] += sum;
  }
  warp_barrier();
}

inline void fiber_entry() {
  Cta& c = cta();
  try {
    c.body();
  } catch (const std::exception& e) {
    if (c.error.empty()) c.error = "thread " + std::to_string(c.current) + ": " + e.what();
  }
  c.fibers[c.current].done = true;
  ++c.progress;
}

// Runs body() as CTA `block` of `threads` threads with `smem_bytes` of shared memory.
inline void run_cta(int threads, size_t smem_bytes, unsigned block, const std::function<void()>& body,
                    unsigned schedule = 0) {
  if (threads < 1 || threads > kMaxWarps * kWarpSize) fail("bad CTA size");
  Cta& c = cta();
  c.threads = threads;
  c.fibers.resize(threads);
  c.body = body;
  c.error.clear();
  c.arrived = 0;
  c.or_value = 0;
  for (int w = 0; w < kMaxWarps; ++w) c.warp_arrived[w] = 0;
  c.smem.assign(smem_bytes + 16, 0xff);
  for (int i = 0; i < threads; ++i) {
    Cta::Fiber& f = c.fibers[i];
    f.stack.resize(kStackBytes);
    f.done = false;
    f.waiting = 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &c.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  blockIdx.x = block;
  std::vector<int> order(threads);
  for (int i = 0; i < threads; ++i) order[i] = i;
  std::mt19937 random(schedule + 7919u * block);
  const int warps = (threads + kWarpSize - 1) / kWarpSize;
  std::vector<char> runs(warps, 1);
  int idle_rounds = 0;  // rounds in a row without progress
  for (;;) {
    bool all_done = true;
    const uint64_t before = c.progress;
    if (schedule != 0) {
      std::shuffle(order.begin(), order.end(), random);
      for (int w = 0; w < warps; ++w) runs[w] = random() & 1;
    }
    for (int n = 0; n < threads && c.error.empty(); ++n) {
      const int i = order[n];
      if (c.fibers[i].done) continue;
      all_done = false;
      if (!runs[i / kWarpSize]) continue;
      c.current = i;
      threadIdx.x = static_cast<unsigned>(i);
      swapcontext(&c.scheduler, &c.fibers[i].context);
    }
    if (!c.error.empty()) fail("block " + std::to_string(block) + ", " + c.error);
    if (all_done) return;
    idle_rounds = c.progress == before ? idle_rounds + 1 : 0;
    if (idle_rounds >= (schedule != 0 ? 64 : 1)) {  // random rounds: 64 idle ones are 2^-64 likely by chance
      std::string where;
      for (int i = 0; i < threads; ++i)
        where += c.fibers[i].done ? '.' : (c.fibers[i].waiting ? c.fibers[i].waiting : '?');
      fail("block " + std::to_string(block) + " deadlocks: a collective not reached by all of its threads "
           "(per thread: C CTA barrier, W warp collective, . finished): " + where);
    }
  }
}

}  // namespace emulation
}  // namespace entmax_cuda

// The CUDA builtins the kernels call, on the emulated CTA.
inline void __syncthreads() { entmax_cuda::emulation::cta_barrier(0); }
inline int __syncthreads_or(int predicate) { return entmax_cuda::emulation::cta_barrier(predicate != 0); }
// Fibers switch only at collectives, so a plain read-modify-write is atomic here.
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}
inline void __trap() { entmax_cuda::emulation::fail("__trap()"); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  namespace em = entmax_cuda::emulation;
  em::check_full_mask(mask);
  em::publish(&value, sizeof value);
  T other;
  std::memcpy(&other, em::slot(em::lane() ^ lane_mask), sizeof other);
  em::warp_barrier();
  return other;
}

inline int __any_sync(unsigned mask, int predicate) {
  namespace em = entmax_cuda::emulation;
  em::check_full_mask(mask);
  const int mine = predicate != 0;
  em::publish(&mine, sizeof mine);
  int any = 0;
  for (int l = 0; l < em::kWarpSize; ++l) {
    int p;
    std::memcpy(&p, em::slot(l), sizeof p);
    any |= p;
  }
  em::warp_barrier();
  return any;
}
