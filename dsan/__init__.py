"""DSAN: Dual Sparse Attention Network for session-based recommendation (Yuan et al., AAAI 2021).

    dsan demo --out runs/demo
    dsan prepare synthetic --out data/demo
    dsan train --data data/demo --run runs/demo
    dsan evaluate --run runs/demo

See docs/dsan.md.
"""
