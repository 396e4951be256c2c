// CPU kernels: rows in parallel (torch's parallel_for), the math from entmax_math.h.
// Short float rows go in batches of one row per SIMD lane (forward_rows.h,
// backward_rows.h), the others one row at a time. The CPU twins of the CUDA kernels
// (gpu_twins.h) are registered here too, as private ops for the tests.
#include "../entmax_math.h"
#include "../entmax_ops.h"
#include "backward_rows.h"
#include "cpu_common.h"
#include "forward_rows.h"
#include "gpu_twins.h"

#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

namespace entmax_cuda {
namespace {

using namespace entmax_cuda::cpu;

// Runs batch(state, r0, lanes) over rows [0, rows) in batches of kBatchLanes rows, in
// parallel, with one State (scratch) per task. Tasks hold whole batches, so that a row's
// batch (and with it the order of its arithmetic) does not depend on the number of threads.
template <typename State, typename Batch>
void parallel_batches(int64_t rows, int64_t n, const Batch& batch) {
  const int64_t batches = (rows + kBatchLanes - 1) / kBatchLanes;
  const int64_t grain = std::max<int64_t>(1, grain_rows(n) / kBatchLanes);
  torch::stable::parallel_for(0, batches, grain, [&](int64_t begin, int64_t end) {
    State state;
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t r0 = bi * kBatchLanes;
      batch(state, r0, static_cast<int>(std::min<int64_t>(kBatchLanes, rows - r0)));
    }
  });
}

template <typename scalar_t>
struct ForwardTaskState {
  ForwardBatch batch;
  ForwardScratch<scalar_t> rows;
};

template <typename scalar_t>
struct BackwardTaskState {
  BackwardBatch batch;
  BackwardRowScratch<scalar_t> rows;
};

template <typename scalar_t>
void forward_cpu_typed(const Tensor& x, const Tensor& alpha, Tensor& y, const RowLayout& l) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* ap = alpha.const_data_ptr<acc_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t rows = l.rows();
  if constexpr (std::is_same<acc_t, float>::value) {  // short float rows: SIMD batches
    if (l.n <= kBatchMaxN) {
      parallel_batches<ForwardTaskState<scalar_t>>(rows, l.n, [&](ForwardTaskState<scalar_t>& s, int64_t r0, int lanes) {
        forward_batch<scalar_t>(xp, yp, ap, r0, lanes, l.n, l.inner, s.batch, s.rows);
      });
      return;
    }
  }
  torch::stable::parallel_for(0, rows, grain_rows(l.n), [&](int64_t begin, int64_t end) {
    ForwardScratch<scalar_t> scratch;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = row_base(r, l.n, l.inner);
      forward_row_dispatch<scalar_t>(xp + base, yp + base, l.n, l.inner, ap[r], scratch);
    }
  });
}

template <typename scalar_t>
void backward_cpu_typed(const Tensor& dy, const Tensor& y, const Tensor& alpha, Tensor& dx, Tensor& dalpha,
                        const RowLayout& l, bool alpha_grad) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const acc_t* ap = alpha.const_data_ptr<acc_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  acc_t* dap = dalpha.mutable_data_ptr<acc_t>();
  const int64_t rows = l.rows();
  if constexpr (std::is_same<acc_t, float>::value) {  // short float rows: SIMD batches
    if (l.n <= kBatchMaxN) {
      parallel_batches<BackwardTaskState<scalar_t>>(rows, l.n, [&](BackwardTaskState<scalar_t>& s, int64_t r0, int lanes) {
        backward_batch<scalar_t>(dyp, yp, dxp, ap, dap, r0, lanes, l.n, l.inner, alpha_grad, s.batch, s.rows);
      });
      return;
    }
  }
  torch::stable::parallel_for(0, rows, grain_rows(l.n), [&](int64_t begin, int64_t end) {
    BackwardRowScratch<scalar_t> scratch;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t base = row_base(r, l.n, l.inner);
      dap[r] = backward_row_dispatch<scalar_t>(dyp + base, yp + base, dxp + base, l.n, l.inner, ap[r], alpha_grad,
                                               scratch);
    }
  });
}

Tensor entmax_forward_cpu(const Tensor& x, const Tensor& alpha, int64_t dim) {
  ENTMAX_CHECK(x.is_cpu(), "entmax_forward_cpu: x must be a CPU tensor");
  ForwardCall c = forward_call(x, alpha, dim);
  if (c.x.numel() > 0) {
    dispatch_float_types(c.x.scalar_type(), [&](auto tag) { forward_cpu_typed<decltype(tag)>(c.x, c.alpha, c.y, c.layout); });
  }
  return c.y;
}

std::tuple<Tensor, Tensor> entmax_backward_cpu(const Tensor& dy, const Tensor& y, const Tensor& alpha, int64_t dim,
                                               bool alpha_grad) {
  ENTMAX_CHECK(y.is_cpu() && dy.is_cpu(), "entmax_backward_cpu: tensors must be on the CPU");
  BackwardCall c = backward_call(dy, y, alpha, dim);
  if (c.y.numel() > 0) {
    dispatch_float_types(c.y.scalar_type(), [&](auto tag) {
      backward_cpu_typed<decltype(tag)>(c.dy, c.y, c.alpha, c.dx, c.dalpha, c.layout, alpha_grad);
    });
  }
  return std::make_tuple(c.dx, c.dalpha);
}

}  // namespace
}  // namespace entmax_cuda

STABLE_TORCH_LIBRARY_IMPL(entmax_cuda, CPU, m) {
  m.impl("entmax_forward", TORCH_BOX(&entmax_cuda::entmax_forward_cpu));
  m.impl("entmax_backward", TORCH_BOX(&entmax_cuda::entmax_backward_cpu));
  m.impl("_gpu_twin_forward", TORCH_BOX(&entmax_cuda::gpu_twin_forward_cpu));
  m.impl("_gpu_twin_backward", TORCH_BOX(&entmax_cuda::gpu_twin_backward_cpu));
}
