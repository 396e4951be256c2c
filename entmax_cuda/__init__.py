"""entmax_cuda: fused adaptive alpha-entmax for PyTorch (CPU and CUDA kernels).

    p = entmax_cuda.entmax(scores, alpha, dim=-1)
    attn = entmax_cuda.AdaptiveEntmax(dim=-1, n_heads=8)

The `entmax` library's sparsemax, entmax15, entmax_bisect and sparsemax_bisect, their
modules and Fenchel-Young losses are here too (same signatures), computed by the same
kernels: code using those switches with `import entmax_cuda as entmax` (the library's
normmax and budget variants are not provided).
See README.md for the semantics (masking, alpha = 1, invalid alpha, dtypes).
"""

from ._build import load_library as _load_library

_load_library()

from .functional import entmax, entmax15, entmax_bisect, sparsemax, sparsemax_bisect  # noqa: E402
from .losses import (  # noqa: E402
    Entmax15Loss,
    EntmaxBisectLoss,
    SparsemaxBisectLoss,
    SparsemaxLoss,
    entmax15_loss,
    entmax_bisect_loss,
    sparsemax_bisect_loss,
    sparsemax_loss,
)
from .modules import AdaptiveEntmax, Entmax15, EntmaxBisect, Sparsemax, SparsemaxBisect  # noqa: E402
from .attention import EntmaxAttention, scaled_dot_product_entmax  # noqa: E402
from .sequences import entmax_with_kvcache, varlen_entmax  # noqa: E402
from . import reference  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "entmax", "AdaptiveEntmax", "reference", "__version__",
    "scaled_dot_product_entmax", "EntmaxAttention", "varlen_entmax", "entmax_with_kvcache",
    # the entmax library's API
    "sparsemax", "entmax15", "entmax_bisect", "sparsemax_bisect",
    "Sparsemax", "Entmax15", "EntmaxBisect", "SparsemaxBisect",
    "sparsemax_loss", "entmax15_loss", "entmax_bisect_loss", "sparsemax_bisect_loss",
    "SparsemaxLoss", "Entmax15Loss", "EntmaxBisectLoss", "SparsemaxBisectLoss",
]
