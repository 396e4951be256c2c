"""DSAN: Dual Sparse Attention Network for session-based recommendation (Yuan et al., AAAI 2021).

    python -m dsan prepare synthetic --out data/demo
    python -m dsan train --data data/demo --run runs/demo
    python -m dsan evaluate --run runs/demo

See docs/dsan.md.
"""

__version__ = "0.1.0"
