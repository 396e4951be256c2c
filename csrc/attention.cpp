// Operator schemas of the fused scaled-dot-product alpha-entmax attention
// (docs/attention.md). The CPU and CUDA files register the implementations;
// entmax_cuda/attention.py adds the fake kernels and the autograd formula.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(entmax_cuda, m) {
  // A padded batch: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any
  // strides; Hq a multiple of Hkv. alpha (B, Hq, Lq): one alpha per query row
  // (float32, float64 for float64 inputs), any strides. mask: none, or
  // (B, Hq, Lq, Lk) of any strides, bool (True = keep) or additive in alpha's dtype.
  // causal: 0 none, 1 upper-left, 2 lower-right. alibi_slopes: none or (B, Hq) in
  // alpha's dtype: -slope |i + Lk - Lq - j| added to the scores. window_left/right:
  // key j visible to row i only if i + Lk - Lq - left <= j <= i + Lk - Lq + right
  // (-1: unbounded). seqused_k: none or int32 (B,): batch entry b uses its first
  // seqused_k[b] keys (Lk above is then per entry).
  // Packed sequences: cu_seqlens_q and cu_seqlens_k int32 (n + 1,) offsets; q, k, v,
  // alpha of batch size 1 with the sequences along the rows ((1, Hq, total_q, D) and
  // so on); max_seqlen_q/k bound their lengths; no mask; B = n.
  // Returns (out (rows_b, Hq, rows_q, Dv), stats (rows_b, Hq, 4, rows_q) in alpha's
  // dtype (m, t, 1/sum p, evaluations), block_map (B, Hq, ceil(Lq/64), ceil(Lk/64))
  // uint8), rows_b/rows_q being q's batch and row sizes.
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor? mask, int causal, "
        "float scale, Tensor? alibi_slopes=None, int window_left=-1, int window_right=-1, "
        "Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, Tensor? seqused_k=None, int max_seqlen_q=0, "
        "int max_seqlen_k=0) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_q, grad_k, grad_v, grad_alpha_per_row); grad_alpha is zero
  // unless alpha_grad is set (its extra row sums cost time).
  // The forward's geometry arguments come after its results.
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor alpha, Tensor? mask, "
        "int causal, float scale, Tensor stats, Tensor block_map, bool alpha_grad, Tensor? alibi_slopes=None, "
        "int window_left=-1, int window_right=-1, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, "
        "Tensor? seqused_k=None, int max_seqlen_q=0, int max_seqlen_k=0) -> (Tensor, Tensor, Tensor, Tensor)");
  // Decoding: a padded batch as attention_forward's, causal bottom-right (query i of Lq
  // sees keys j <= i + L - Lq, L = seqused_k[b] or Lk), no mask, forward only. The keys
  // are split into num_splits parts worked on in parallel (0: the op chooses; the CUDA
  // op fills the device) that agree on each row's threshold before any output is formed
  // (docs/attention.md, decoding). Returns (out (B, Hq, Lq, Dv), stats (B, Hq, 4, Lq)).
  m.def("attention_decode(Tensor q, Tensor k, Tensor v, Tensor alpha, float scale, Tensor? alibi_slopes, "
        "int window_left, int window_right, Tensor? seqused_k, int num_splits) -> (Tensor, Tensor)");
}
