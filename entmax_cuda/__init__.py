"""entmax_cuda: fused adaptive alpha-entmax for PyTorch (CPU and CUDA kernels).

    p = entmax_cuda.entmax(scores, alpha, dim=-1)
    attn = entmax_cuda.AdaptiveEntmax(dim=-1, n_heads=8)

See README.md for the semantics (masking, alpha = 1, invalid alpha, dtypes).
"""

from ._build import load_library as _load_library

_load_library()

from .functional import entmax, entmax_bisect  # noqa: E402
from .modules import AdaptiveEntmax  # noqa: E402
from .attention import EntmaxAttention, scaled_dot_product_entmax  # noqa: E402
from . import reference  # noqa: E402

__version__ = "0.1.0"
__all__ = ["entmax", "entmax_bisect", "AdaptiveEntmax", "reference", "__version__"]
