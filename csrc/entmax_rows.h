// The row algorithms of the CUDA kernels, written once for the device and for their CPU
// twins (cpu/gpu_twins.h), which run the same steps lane by lane, so that the CPU tests
// exercise what the GPU runs: the launch plans, how a row is classified, which entries
// are candidates and in which order they are compacted, each lane's (or thread's) share
// of every sum, and the order in which the shares are combined. No torch, no CUDA API.
//
// Two kernel shapes (csrc/cuda/*_kernels.cuh):
//  - rows of up to kMaxGroupRow entries: a group of G lanes of a warp per row (several
//    rows per warp), K entries per lane in registers (entry k at lane k % G, slot k / G);
//  - longer rows: a block per row, or a cluster of up to kMaxClusterBlocks blocks when
//    there are fewer rows than multiprocessors (each block a chunk of the row, the
//    blocks' shares combined through distributed shared memory in rank order).
#pragma once

#include "entmax_math.h"

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define ENTMAX_UNROLL _Pragma("unroll")
#else
#define ENTMAX_UNROLL
#endif

namespace entmax_cuda {
namespace rows {

using namespace entmax_cuda::math;

// ------------------------------------------------------------------ launch plans

constexpr int kWarpLanes = 32;

// A row of up to lanes * per_lane entries on `lanes` lanes of a warp, `per_lane` each.
struct GroupShape {
  int lanes;
  int per_lane;
  constexpr int64_t max_n() const { return static_cast<int64_t>(lanes) * per_lane; }
};

// The ladder, shortest rows first: few lanes per row (a warp then solves several rows at
// once and shares the root finder's bookkeeping among them; fewer shuffle levels per sum),
// up to a whole warp with 32 entries per lane.
constexpr GroupShape kGroupShapes[] = {{8, 8}, {8, 16}, {16, 16}, {32, 16}, {32, 32}};
constexpr int64_t kMaxGroupRow = 1024;
static_assert(kGroupShapes[4].max_n() == kMaxGroupRow, "the ladder ends at kMaxGroupRow");

// Calls BODY with the compile-time GroupShape SHAPE of rows of length N (N <= kMaxGroupRow):
// the runtime size becomes a template argument in one place (as flash-attention's
// static_switch.h).
#define ENTMAX_GROUP_SHAPE_SWITCH(N, SHAPE, ...)                                     \
  [&] {                                                                              \
    if ((N) <= ::entmax_cuda::rows::kGroupShapes[0].max_n()) {                       \
      constexpr ::entmax_cuda::rows::GroupShape SHAPE = ::entmax_cuda::rows::kGroupShapes[0]; \
      return __VA_ARGS__();                                                          \
    } else if ((N) <= ::entmax_cuda::rows::kGroupShapes[1].max_n()) {                \
      constexpr ::entmax_cuda::rows::GroupShape SHAPE = ::entmax_cuda::rows::kGroupShapes[1]; \
      return __VA_ARGS__();                                                          \
    } else if ((N) <= ::entmax_cuda::rows::kGroupShapes[2].max_n()) {                \
      constexpr ::entmax_cuda::rows::GroupShape SHAPE = ::entmax_cuda::rows::kGroupShapes[2]; \
      return __VA_ARGS__();                                                          \
    } else if ((N) <= ::entmax_cuda::rows::kGroupShapes[3].max_n()) {                \
      constexpr ::entmax_cuda::rows::GroupShape SHAPE = ::entmax_cuda::rows::kGroupShapes[3]; \
      return __VA_ARGS__();                                                          \
    } else {                                                                         \
      constexpr ::entmax_cuda::rows::GroupShape SHAPE = ::entmax_cuda::rows::kGroupShapes[4]; \
      return __VA_ARGS__();                                                          \
    }                                                                                \
  }()

// Calls BODY with the compile-time bool NAME = COND.
#define ENTMAX_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                     \
    if (COND) {                             \
      constexpr bool NAME = true;           \
      return __VA_ARGS__();                 \
    } else {                                \
      constexpr bool NAME = false;          \
      return __VA_ARGS__();                 \
    }                                       \
  }()

// Threads per block of the group kernels (rows per block: kGroupBlockThreads / lanes), and
// the blocks per multiprocessor their register budget must allow (at most 128 registers a
// thread: 16 warps in flight; unbounded, the unrolled entries took up to 228).
constexpr int kGroupBlockThreads = 128;
constexpr int kGroupMinBlocksPerSM = 4;

// Long rows: threads per block, and blocks per row at most (a portable cluster size).
constexpr int kLongRowThreads = 512;
constexpr int kLongRowWarps = kLongRowThreads / kWarpLanes;
constexpr int kMaxClusterBlocks = 8;
// Entries a thread loads at once (16-byte loads of float rows), so chunks are multiples of it.
constexpr int kVectorEntries = 4;

// Blocks per long row: one, unless clusters are available and there are fewer rows than
// multiprocessors; then enough to fill them (a power of two up to kMaxClusterBlocks).
ENTMAX_HD int long_row_blocks(int64_t rows, int multiprocessors, bool clusters) {
  if (!clusters || rows <= 0 || rows >= multiprocessors) return 1;
  int blocks = 1;
  while (blocks < kMaxClusterBlocks && rows * blocks < multiprocessors) blocks *= 2;
  return blocks;
}

// The entries [begin, end) of block `rank` of the `blocks` that share a row of n entries.
struct Chunk {
  int64_t begin, end;
};

ENTMAX_HD Chunk long_row_chunk(int64_t n, int blocks, int rank) {
  int64_t size = (n + blocks - 1) / blocks;
  size = (size + kVectorEntries - 1) / kVectorEntries * kVectorEntries;
  const int64_t begin = size * rank < n ? size * rank : n;
  const int64_t end = begin + size < n ? begin + size : n;
  return {begin, end};
}

// ------------------------------------------------------------------ rows

// What a row needs, from its max, whether it holds NaN or +inf, and its eps.
enum class RowKind : int {
  kSolve,  // find the threshold in the row's arithmetic (softmax rows too: one evaluation)
  kWide,   // a float row with alpha > 2: in double (see cpu/forward_rows.h)
  kNan,    // NaN or +inf in the row, or an invalid alpha: NaN everywhere
  kZero,   // every entry -inf: zeros by definition
};

template <typename acc_t>
ENTMAX_HD RowKind classify_row(bool bad, acc_t m, acc_t eps) {
  if (bad || !(eps >= acc_t(0)) || eps == -neg_inf<acc_t>()) return RowKind::kNan;
  if (m == neg_inf<acc_t>()) return RowKind::kZero;
  if (std::is_same<acc_t, float>::value && eps > acc_t(1)) return RowKind::kWide;
  return RowKind::kSolve;
}

// NaN or +inf: the row is NaN.
template <typename acc_t>
ENTMAX_HD bool is_bad_entry(acc_t v) {
  return v != v || v == -neg_inf<acc_t>();
}

// Entries more than 1/eps below the max are zero at every threshold (section 8); the
// others are the candidates. In double, so float rows decide it the same way everywhere.
// eps = 0 (softmax): every finite entry.
template <typename acc_t>
ENTMAX_HD bool is_candidate(acc_t v, acc_t m, acc_t eps) {
  const double cutoff = eps > acc_t(0) ? -1.0 / static_cast<double>(eps) : static_cast<double>(neg_inf<acc_t>());
  return static_cast<double>(v) - static_cast<double>(m) > cutoff;
}

// ------------------------------------------------------------------ lane shares (group kernels)
//
// Lane `lane` of a row's group of G lanes holds entries k = lane + j * G (j < K) and
// candidates q = lane + i * G of the row's compacted candidates (row order).

// The lane's share of a Jensen recount: candidates with u = value - m above cut.
template <typename comp_t, typename acc_t, int G, int K>
ENTMAX_HD void lane_jensen_share(const acc_t* value, int c, int lane, comp_t m, comp_t cut, comp_t& sum,
                                 comp_t& count) {
  ENTMAX_UNROLL
  for (int i = 0; i < K; ++i) {
    const int q = lane + i * G;
    if (q >= c) break;
    const comp_t u = static_cast<comp_t>(value[q]) - m;
    if (u > cut) {
      sum += u;
      count += comp_t(1);
    }
  }
}

// The lane's share of the root sums at threshold t; its candidates' p into p[i].
template <typename comp_t, typename acc_t, typename M, int G, int K>
ENTMAX_HD RootSums<comp_t> lane_root_share(const acc_t* value, int c, int lane, comp_t m, comp_t t, comp_t eps,
                                           comp_t inv_eps, EntryForm form, comp_t (&p)[K]) {
  RootSums<comp_t> s;
  s.zero();
  ENTMAX_UNROLL
  for (int i = 0; i < K; ++i) {
    const int q = lane + i * G;
    if (q >= c) break;
    const EntryTerms<comp_t> e = entry_terms<comp_t, M>(static_cast<comp_t>(value[q]) - m, t, eps, inv_eps, form);
    p[i] = e.p;
    s.add(e.p, e.p_over_z, e.curvature);
  }
  return s;
}

// Writes the lane's entries of a row: its non-candidate entries get `fill` (0, or NaN for
// a NaN row), its candidates p * inv_F at their positions. Every entry is written once.
template <typename scalar_t, typename comp_t, typename acc_t, int G, int K>
ENTMAX_HD void lane_write(scalar_t* y, int n, int lane, unsigned candidate_slots, acc_t fill, const uint16_t* index,
                          int c, const comp_t (&p)[K], comp_t inv_F) {
  ENTMAX_UNROLL
  for (int j = 0; j < K; ++j) {
    const int k = lane + j * G;
    if (k < n && !((candidate_slots >> j) & 1u)) y[k] = static_cast<scalar_t>(fill);
  }
  ENTMAX_UNROLL
  for (int i = 0; i < K; ++i) {
    const int q = lane + i * G;
    if (q >= c) break;
    y[index[q]] = static_cast<scalar_t>(p[i] * inv_F);
  }
}

// Writes `fill` to every entry of the lane (NaN rows, all-masked rows).
template <typename scalar_t, typename acc_t, int G, int K>
ENTMAX_HD void lane_fill(scalar_t* y, int n, int lane, acc_t fill) {
  ENTMAX_UNROLL
  for (int j = 0; j < K; ++j) {
    const int k = lane + j * G;
    if (k < n) y[k] = static_cast<scalar_t>(fill);
  }
}

// The lane's share of the backward's first-pass sums (sections 4 and 5); g of its entries
// into g[j]. Without ALPHA_GRAD only sum g and sum g dy are formed.
template <bool ALPHA_GRAD, typename comp_t, typename acc_t, typename M, int G, int K>
ENTMAX_HD BackwardSums<comp_t> lane_backward_share(const acc_t (&p)[K], const acc_t (&dy)[K], int n, int lane,
                                                   comp_t eps, comp_t inv_eps, EntryForm form, comp_t (&g)[K]) {
  BackwardSums<comp_t> s;
  s.zero();
  ENTMAX_UNROLL
  for (int j = 0; j < K; ++j) {
    g[j] = comp_t(0);
    const int k = lane + j * G;
    const comp_t pk = static_cast<comp_t>(p[j]);
    if (k >= n || !on_support(pk)) continue;
    const comp_t d = static_cast<comp_t>(dy[j]);
    if (ALPHA_GRAD) {
      const BackwardTerms<comp_t> b = backward_terms_at<comp_t, M>(pk, eps, inv_eps);
      add_backward_terms(d, b, s);
      g[j] = b.g;
    } else {
      g[j] = support_weight_in_form<comp_t, M>(pk, eps, form);
      s.g += g[j];
      s.g_dy += g[j] * d;
    }
  }
  return s;
}

// The lane's dX = g (dy - q) into dx (entries k < n), and with ALPHA_GRAD its share of the
// two-pass alpha-gradient, sum dX (c - center) (c recomputed from p: no registers kept).
template <bool ALPHA_GRAD, typename comp_t, typename scalar_t, typename acc_t, typename M, int G, int K>
ENTMAX_HD comp_t lane_backward_output(const acc_t (&p)[K], const acc_t (&dy)[K], const comp_t (&g)[K],
                                      scalar_t* dx, int n, int lane, comp_t eps, comp_t inv_eps, comp_t q,
                                      const AlphaCenter<comp_t>& center) {
  comp_t share = 0;
  ENTMAX_UNROLL
  for (int j = 0; j < K; ++j) {
    const int k = lane + j * G;
    if (k >= n) continue;
    const comp_t d = g[j] * (static_cast<comp_t>(dy[j]) - q);
    dx[k] = static_cast<scalar_t>(d);
    if (ALPHA_GRAD && on_support(static_cast<comp_t>(p[j]))) {
      share += alpha_gradient_term(d, backward_terms_at<comp_t, M>(static_cast<comp_t>(p[j]), eps, inv_eps).c_key, center);
    }
  }
  return share;
}

// ------------------------------------------------------------------ thread shares (long rows)
//
// Thread `tid` of a block of kLongRowThreads takes entries k = begin + tid + i * threads of
// its block's chunk [begin, end). Its sums are float partial sums of kChunkTerms terms
// flushed into double (ChunkedSum), so a million-entry row keeps float32's last digit.

constexpr int kChunkTerms = 32;

struct ChunkedSum {
  double total = 0;
  float part = 0;
  int count = 0;
  ENTMAX_HD void add(float v) {
    part += v;
    if (++count == kChunkTerms) {
      total += part;
      part = 0;
      count = 0;
    }
  }
  ENTMAX_HD void add(double v) { total += v; }
  ENTMAX_HD double value() const { return total + part; }
};

// The thread's share of the candidates' count and sum of u (Jensen's start; count above
// cut; the first round takes cut = -1/eps, the candidates themselves).
template <typename comp_t, typename Src>
ENTMAX_HD void thread_jensen_share(const Src* src, Chunk chunk, int tid, int threads, comp_t m, comp_t cut,
                                   double& sum, double& count) {
  for (int64_t k = chunk.begin + tid; k < chunk.end; k += threads) {
    const comp_t u = static_cast<comp_t>(src[k]) - m;
    if (u > cut) {
      sum += static_cast<double>(u);
      count += 1.0;
    }
  }
}

// The thread's share of the root sums at t (entries outside the support at t skipped
// before any special function).
template <typename comp_t, typename M, typename Src>
ENTMAX_HD RootSums<double> thread_root_share(const Src* src, Chunk chunk, int tid, int threads, comp_t m, comp_t t,
                                             comp_t eps, comp_t inv_eps, EntryForm form) {
  ChunkedSum F, minus_dF, d2F;
  for (int64_t k = chunk.begin + tid; k < chunk.end; k += threads) {
    const comp_t u = static_cast<comp_t>(src[k]) - m;
    if (form != EntryForm::kSoftmax && !(eps * (u - t) > comp_t(-1))) continue;
    const EntryTerms<comp_t> e = entry_terms<comp_t, M>(u, t, eps, inv_eps, form);
    F.add(e.p);
    minus_dF.add(e.p_over_z);
    d2F.add(e.curvature);
  }
  return {F.value(), -minus_dF.value(), d2F.value()};
}

// The thread's share of the backward's first-pass sums over its entries of a long row.
template <bool ALPHA_GRAD, typename comp_t, typename M, typename Src>
ENTMAX_HD BackwardSums<double> thread_backward_share(const Src* p, const Src* dy, Chunk chunk, int tid, int threads,
                                                     comp_t eps, comp_t inv_eps, EntryForm form) {
  BackwardSums<comp_t> part;
  BackwardSums<double> total;
  part.zero();
  total.zero();
  int count = 0;
  for (int64_t k = chunk.begin + tid; k < chunk.end; k += threads) {
    const comp_t pk = static_cast<comp_t>(p[k]);
    if (!on_support(pk)) continue;
    const comp_t d = static_cast<comp_t>(dy[k]);
    if (ALPHA_GRAD) {
      add_backward_terms(d, backward_terms_at<comp_t, M>(pk, eps, inv_eps), part);
    } else {
      const comp_t g = support_weight_in_form<comp_t, M>(pk, eps, form);
      part.g += g;
      part.g_dy += g * d;
    }
    if (++count == kChunkTerms) {
      total = total + widen(part);
      part.zero();
      count = 0;
    }
  }
  return total + widen(part);
}

// The thread's dX = g (dy - q) of its entries of a long row, and with ALPHA_GRAD its share
// of the two-pass alpha-gradient, sum dX (c - center), flushed into double as the sums.
template <bool ALPHA_GRAD, typename comp_t, typename M, typename Src, typename scalar_t>
ENTMAX_HD double thread_backward_output(const Src* p, const Src* dy, scalar_t* dx, Chunk chunk, int tid, int threads,
                                        comp_t eps, comp_t inv_eps, EntryForm form, comp_t q,
                                        const AlphaCenter<comp_t>& center) {
  ChunkedSum share;
  for (int64_t k = chunk.begin + tid; k < chunk.end; k += threads) {
    const comp_t pk = static_cast<comp_t>(p[k]);
    const bool on = on_support(pk);
    comp_t g = 0, c = 0;
    if (on && ALPHA_GRAD) {
      const BackwardTerms<comp_t> b = backward_terms_at<comp_t, M>(pk, eps, inv_eps);
      g = b.g;
      c = b.c_key;
    } else if (on) {
      g = support_weight_in_form<comp_t, M>(pk, eps, form);
    }
    const comp_t d = g * (static_cast<comp_t>(dy[k]) - q);
    dx[k] = static_cast<scalar_t>(d);
    if (ALPHA_GRAD && on) share.add(alpha_gradient_term(d, c, center));
  }
  return share.value();
}

}  // namespace rows
}  // namespace entmax_cuda
