// Operator schemas of the entmax_cuda library. The CPU and CUDA files register
// their implementations; Python (entmax_cuda/ops.py) adds fake kernels and autograd.
#include <Python.h>

#include <torch/csrc/stable/library.h>

extern "C" {
// An empty module: importing entmax_cuda._C loads this shared object, which
// runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

STABLE_TORCH_LIBRARY(entmax_cuda, m) {
  // y = alpha-entmax(x) along dim; alpha holds one value per row
  // (x's shape with size 1 along dim).
  m.def("entmax_forward(Tensor x, Tensor alpha, int dim) -> Tensor");
  // Returns (grad_x, grad_alpha_per_row) from the saved output y; with alpha_grad false
  // the alpha-gradient is not computed (grad_alpha_per_row is zeros).
  m.def("entmax_backward(Tensor grad_y, Tensor y, Tensor alpha, int dim, bool alpha_grad=True) -> (Tensor, Tensor)");
  // Private, for the tests: the CUDA kernels' algorithms run on the CPU (cpu/gpu_twins.h);
  // rows along the last dim; blocks_per_row: the cluster size a GPU would choose for long rows.
  m.def("_gpu_twin_forward(Tensor x, Tensor alpha, int dim, int blocks_per_row) -> Tensor");
  m.def("_gpu_twin_backward(Tensor grad_y, Tensor y, Tensor alpha, int dim, bool alpha_grad, int blocks_per_row)"
        " -> (Tensor, Tensor)");
}

