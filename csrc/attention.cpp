// Operator schemas of the fused scaled-dot-product alpha-entmax attention
// (docs/attention.md). The CPU and CUDA files register the implementations;
// entmax_cuda/attention.py adds the fake kernels and the autograd formula.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(entmax_cuda, m) {
  // q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any strides; Hq a
  // multiple of Hkv. alpha (B, Hq, Lq): one alpha per query row (float32, float64
  // for float64 inputs), any strides. mask: none, or (B, Hq, Lq, Lk) of any
  // strides, bool (True = keep) or additive in alpha's dtype. causal: 0 none,
  // 1 upper-left, 2 lower-right. Returns (out (B, Hq, Lq, Dv), stats
  // (B, Hq, 4, Lq) in alpha's dtype (m, t, 1/sum p, evaluations), block_map (B, Hq, ceil(Lq/64), ceil(Lk/64)) uint8).
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor? mask, int causal, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v, grad_alpha_per_row); grad_alpha is zero
  // unless alpha_grad is set (its extra row sums cost time).
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor? mask, "
        "int causal, float scale, Tensor stats, Tensor block_map, bool alpha_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}
