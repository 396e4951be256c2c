// Argument checks and row layout shared by the CPU and CUDA launchers.
#pragma once

#include "entmax_math.h"

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace entmax_cuda {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

// Helpers with internal linkage: _C and _C_cuda each keep their own copy
// (no cross-library symbol interposition).
namespace {

// Error messages are built from std::string pieces, never iostreams: a stream
// formatting an integer crashed inside _C_cuda on the H200 machine (torch 2.11,
// nvcc 13), so nothing on the error path of either library uses one.
inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
template <typename T>
inline std::string to_text(T v) { return std::to_string(v); }

template <typename... Args>
inline std::string concat(const Args&... args) {
  std::string out;
  (out += ... += to_text(args));
  return out;
}

}  // namespace
}  // namespace entmax_cuda

// ENTMAX_CHECK(cond, pieces...): throws std::runtime_error (RuntimeError in Python).
#define ENTMAX_CHECK(cond, ...)                                                \
  do {                                                                         \
    if (!(cond)) throw std::runtime_error(::entmax_cuda::concat(__VA_ARGS__)); \
  } while (0)

namespace entmax_cuda {
namespace {

// A tensor seen as rows along `dim`: element k of row (o, i) sits at
// o * n * inner + k * inner + i in the contiguous tensor.
struct RowLayout {
  int64_t outer = 1;
  int64_t n = 1;
  int64_t inner = 1;
  int64_t rows() const { return outer * inner; }
};

inline int64_t wrap_dim(int64_t dim, int64_t ndim) {
  ENTMAX_CHECK(ndim >= 1, "entmax: input must have at least one dimension");
  ENTMAX_CHECK(dim >= -ndim && dim < ndim, "entmax: dim ", dim,
                  " is out of range for a tensor of ", ndim, " dimensions");
  return dim < 0 ? dim + ndim : dim;
}

inline RowLayout row_layout(const Tensor& x, int64_t dim) {
  RowLayout l;
  for (int64_t i = 0; i < x.dim(); ++i) {
    if (i < dim) l.outer *= x.size(i);
    else if (i == dim) l.n = x.size(i);
    else l.inner *= x.size(i);
  }
  return l;
}

// The kernels index a row's entries with 32-bit integers.
constexpr int64_t kMaxRowLength = 2147483647;

inline void check_row_length(const RowLayout& l) {
  ENTMAX_CHECK(l.n <= kMaxRowLength, "entmax: rows of ", l.n, " entries are longer than the supported ",
               kMaxRowLength);
}

inline bool is_supported_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}

// alpha: one value per row, x's shape with size 1 along dim, float32
// (float64 for double inputs). The Python layer broadcasts it there.
inline ScalarType alpha_dtype_for(ScalarType x) {
  return x == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

inline void check_rows_tensor(const Tensor& x, const Tensor& a, int64_t dim, const char* what) {
  ENTMAX_CHECK(a.dim() == x.dim(), "entmax: ", what, " must have ", x.dim(),
                  " dimensions (x's shape with size 1 along dim), got ", a.dim());
  for (int64_t i = 0; i < x.dim(); ++i) {
    const int64_t want = i == dim ? 1 : x.size(i);
    ENTMAX_CHECK(a.size(i) == want, "entmax: ", what, " has size ", a.size(i),
                    " at dimension ", i, ", expected ", want);
  }
  ENTMAX_CHECK(a.scalar_type() == alpha_dtype_for(x.scalar_type()), "entmax: ", what,
                  " must be float64 for float64 input and float32 otherwise");
  ENTMAX_CHECK(a.device().type() == x.device().type() && a.get_device_index() == x.get_device_index(), "entmax: ", what, " is on another device than x");
}

// Calls f(scalar_t{}) for x's floating dtype.
template <typename F>
void dispatch_float_types(ScalarType t, const F& f) {
  switch (t) {
    case ScalarType::Float: f(float{}); break;
    case ScalarType::Double: f(double{}); break;
    case ScalarType::Half: f(torch::headeronly::Half{}); break;
    case ScalarType::BFloat16: f(torch::headeronly::BFloat16{}); break;
    default: ENTMAX_CHECK(false, "entmax: unsupported dtype");
  }
}

inline void check_input(const Tensor& x, const char* what) {
  ENTMAX_CHECK(is_supported_float(x.scalar_type()), "entmax: ", what,
                  " must be float16, bfloat16, float32 or float64");
}

// The backward op's arguments: grad and output alike, alpha per row.
inline void check_backward_args(const Tensor& dy, const Tensor& y, const Tensor& alpha, int64_t dim) {
  check_input(y, "y");
  ENTMAX_CHECK(dy.scalar_type() == y.scalar_type(), "entmax_backward: grad and output dtypes differ");
  ENTMAX_CHECK(dy.sizes().equals(y.sizes()), "entmax_backward: grad and output shapes differ");
  check_rows_tensor(y, alpha, dim, "alpha");
}

// The CPU ops' arguments, checked, made contiguous, with the outputs allocated
// (dalpha zeroed for empty inputs, which no kernel touches).
struct ForwardCall {
  Tensor x, alpha, y;
  RowLayout layout;
};

inline ForwardCall forward_call(const Tensor& x_in, const Tensor& alpha_in, int64_t dim) {
  check_input(x_in, "x");
  dim = wrap_dim(dim, x_in.dim());
  check_rows_tensor(x_in, alpha_in, dim, "alpha");
  const Tensor x = torch::stable::contiguous(x_in);
  ForwardCall call{x, torch::stable::contiguous(alpha_in), torch::stable::empty_like(x), row_layout(x, dim)};
  check_row_length(call.layout);
  return call;
}

struct BackwardCall {
  Tensor dy, y, alpha, dx, dalpha;
  RowLayout layout;
};

inline BackwardCall backward_call(const Tensor& dy_in, const Tensor& y_in, const Tensor& alpha_in, int64_t dim) {
  dim = wrap_dim(dim, y_in.dim());
  check_backward_args(dy_in, y_in, alpha_in, dim);
  const Tensor y = torch::stable::contiguous(y_in);
  const Tensor alpha = torch::stable::contiguous(alpha_in);
  BackwardCall call{torch::stable::contiguous(dy_in), y, alpha, torch::stable::empty_like(y),
                    torch::stable::empty_like(alpha), row_layout(y, dim)};
  check_row_length(call.layout);
  if (y.numel() == 0) torch::stable::zero_(call.dalpha);
  return call;
}

}  // namespace
}  // namespace entmax_cuda
