// entmax_cuda._C_cuda: the CUDA kernels as a module of their own, so that a
// build made with CUDA still imports (CPU kernels only) under a CPU-only torch.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
