"""Integrations of entmax attention with other libraries, each an optional extra:
`entmax_cuda.integrations.transformers` (pip install "entmax-cuda[hf]")."""
