// CUDA ops: argument checks, the rows made contiguous, the launch plan (entmax_rows.h:
// a group of lanes per row up to 1024 entries, else a block or a cluster of blocks per
// row) and the launches, all on the current stream (nothing synchronises with the host).
// The kernels are in forward_kernels.cuh and backward_kernels.cuh.
#include "../entmax_math.h"
#include "../entmax_ops.h"
#include "../entmax_rows.h"
#include "backward_kernels.cuh"
#include "forward_kernels.cuh"
#include "launch.cuh"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>

#include <tuple>

namespace entmax_cuda {
namespace {

using namespace entmax_cuda::cuda;
using namespace entmax_cuda::rows;

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks per long row: as many as rows::long_row_blocks asks for, fewer where clusters of
// that size cannot run (kernel_of(blocks) is the kernel that would run them).
template <typename KernelOf>
int long_row_blocks_that_fit(int64_t rows, int device, const KernelOf& kernel_of) {
  const DeviceInfo& dev = device_info(device);
  int blocks = long_row_blocks(rows, dev.multiprocessors, dev.cluster_launch);
  while (blocks > 1) {
    int smem = 0;
    const void* kernel = kernel_of(blocks, smem);
    if (cluster_fits(kernel, device, blocks, smem, kLongRowThreads)) break;
    blocks /= 2;
  }
  return blocks;
}

// The long-row forward's dynamic shared memory: its chunk in acc_t, if that fits.
template <typename acc_t>
int long_row_cache_bytes(int64_t n, int blocks, int device) {
  const Chunk chunk = long_row_chunk(n, blocks, 0);
  const int64_t bytes = (chunk.end - chunk.begin) * static_cast<int64_t>(sizeof(acc_t));
  return bytes + kStaticSmemMargin <= device_info(device).max_dynamic_smem ? static_cast<int>(bytes) : 0;
}

template <typename scalar_t>
void launch_forward(const Tensor& x, const Tensor& alpha, Tensor& y, int64_t rows, int64_t n) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* ap = alpha.const_data_ptr<acc_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const cudaStream_t stream = current_stream(x);
  const int device = x.get_device_index();
  if (n <= kMaxGroupRow) {
    ENTMAX_GROUP_SHAPE_SWITCH(n, shape, [&] {
      constexpr int kRowsPerBlock = kGroupBlockThreads / shape.lanes;
      forward_group_kernel<scalar_t, shape.lanes, shape.per_lane>
          <<<grid_for(ceil_div(rows, kRowsPerBlock)), kGroupBlockThreads, 0, stream>>>(xp, ap, yp, rows,
                                                                                       static_cast<int>(n));
    });
    ENTMAX_CUDA_CHECK(cudaGetLastError(), "entmax forward launch");
    return;
  }
  const int blocks = long_row_blocks_that_fit(rows, device, [&](int b, int& smem) {
    smem = long_row_cache_bytes<acc_t>(n, b, device);
    return ENTMAX_BOOL_SWITCH(smem > 0, kCached, [&] {
      return ENTMAX_CLUSTER_SWITCH(b, kBlocks, [&] {
        return reinterpret_cast<const void*>(forward_long_row_kernel<scalar_t, kCached, kBlocks>);
      });
    });
  });
  const int smem = long_row_cache_bytes<acc_t>(n, blocks, device);
  ENTMAX_BOOL_SWITCH(smem > 0, kCached, [&] {
    ENTMAX_CLUSTER_SWITCH(blocks, kBlocks, [&] {
      launch_clustered(forward_long_row_kernel<scalar_t, kCached, kBlocks>, grid_for(rows), kBlocks,
                       kLongRowThreads, smem, stream, xp, ap, yp, rows, n);
    });
  });
}

template <typename scalar_t>
void launch_backward(const Tensor& dy, const Tensor& y, const Tensor& alpha, Tensor& dx, Tensor& dalpha,
                     int64_t rows, int64_t n, bool alpha_grad) {
  using acc_t = typename AccType<scalar_t>::type;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const acc_t* ap = alpha.const_data_ptr<acc_t>();
  scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
  acc_t* dap = dalpha.mutable_data_ptr<acc_t>();
  const cudaStream_t stream = current_stream(y);
  const int device = y.get_device_index();
  ENTMAX_BOOL_SWITCH(alpha_grad, kAlphaGrad, [&] {
    if (n <= kMaxGroupRow) {
      ENTMAX_GROUP_SHAPE_SWITCH(n, shape, [&] {
        constexpr int kRowsPerBlock = kGroupBlockThreads / shape.lanes;
        backward_group_kernel<scalar_t, shape.lanes, shape.per_lane, kAlphaGrad>
            <<<grid_for(ceil_div(rows, kRowsPerBlock)), kGroupBlockThreads, 0, stream>>>(dyp, yp, ap, dxp, dap, rows,
                                                                                         static_cast<int>(n));
      });
      ENTMAX_CUDA_CHECK(cudaGetLastError(), "entmax backward launch");
      return;
    }
    const int blocks = long_row_blocks_that_fit(rows, device, [&](int b, int& smem) {
      smem = 0;
      return ENTMAX_CLUSTER_SWITCH(b, kBlocks, [&] {
        return reinterpret_cast<const void*>(backward_long_row_kernel<scalar_t, kAlphaGrad, kBlocks>);
      });
    });
    ENTMAX_CLUSTER_SWITCH(blocks, kBlocks, [&] {
      launch_clustered(backward_long_row_kernel<scalar_t, kAlphaGrad, kBlocks>, grid_for(rows), kBlocks,
                       kLongRowThreads, 0, stream, dyp, yp, ap, dxp, dap, rows, n);
    });
  });
}

// The kernels work on rows that are contiguous in memory. When dim is not the
// innermost axis, move it there (adjacent transposes keep the other axes in
// order, so row r still pairs with alpha's flat entry r) and move it back after.
Tensor dim_to_last(const Tensor& t, int64_t dim) {
  Tensor r = t;
  for (int64_t d = dim; d + 1 < t.dim(); ++d) r = torch::stable::transpose(r, d, d + 1);
  return torch::stable::contiguous(r);
}

Tensor last_to_dim(const Tensor& t, int64_t dim) {
  Tensor r = t;
  for (int64_t d = t.dim() - 2; d >= dim; --d) r = torch::stable::transpose(r, d, d + 1);
  return torch::stable::contiguous(r);
}

Tensor entmax_forward_cuda(const Tensor& x_in, const Tensor& alpha_in, int64_t dim) {
  check_input(x_in, "x");
  ENTMAX_CHECK(x_in.is_cuda(), "entmax_forward_cuda: x must be a CUDA tensor");
  dim = wrap_dim(dim, x_in.dim());
  check_rows_tensor(x_in, alpha_in, dim, "alpha");
  const torch::stable::accelerator::DeviceGuard guard(x_in.get_device_index());
  const RowLayout l = row_layout(x_in, dim);
  check_row_length(l);
  const bool move = l.inner > 1;
  const Tensor x = move ? dim_to_last(x_in, dim) : torch::stable::contiguous(x_in);
  const Tensor alpha = torch::stable::contiguous(alpha_in);
  Tensor y = torch::stable::empty_like(x);
  if (x.numel() > 0) {
    dispatch_float_types(x.scalar_type(), [&](auto tag) { launch_forward<decltype(tag)>(x, alpha, y, l.rows(), l.n); });
  }
  return move ? last_to_dim(y, dim) : y;
}

std::tuple<Tensor, Tensor> entmax_backward_cuda(const Tensor& dy_in, const Tensor& y_in, const Tensor& alpha_in,
                                                int64_t dim, bool alpha_grad) {
  ENTMAX_CHECK(y_in.is_cuda() && dy_in.is_cuda(), "entmax_backward_cuda: tensors must be CUDA tensors");
  dim = wrap_dim(dim, y_in.dim());
  check_backward_args(dy_in, y_in, alpha_in, dim);
  const torch::stable::accelerator::DeviceGuard guard(y_in.get_device_index());
  const RowLayout l = row_layout(y_in, dim);
  check_row_length(l);
  const bool move = l.inner > 1;
  const Tensor dy = move ? dim_to_last(dy_in, dim) : torch::stable::contiguous(dy_in);
  const Tensor y = move ? dim_to_last(y_in, dim) : torch::stable::contiguous(y_in);
  const Tensor alpha = torch::stable::contiguous(alpha_in);
  Tensor dx = torch::stable::empty_like(y);
  Tensor dalpha = torch::stable::empty_like(alpha);
  if (y.numel() == 0) {
    torch::stable::zero_(dalpha);
  } else {
    dispatch_float_types(y.scalar_type(), [&](auto tag) {
      launch_backward<decltype(tag)>(dy, y, alpha, dx, dalpha, l.rows(), l.n, alpha_grad);
    });
  }
  return std::make_tuple(move ? last_to_dim(dx, dim) : dx, dalpha);
}

}  // namespace
}  // namespace entmax_cuda

STABLE_TORCH_LIBRARY_IMPL(entmax_cuda, CUDA, m) {
  m.impl("entmax_forward", TORCH_BOX(&entmax_cuda::entmax_forward_cuda));
  m.impl("entmax_backward", TORCH_BOX(&entmax_cuda::entmax_backward_cuda));
}
