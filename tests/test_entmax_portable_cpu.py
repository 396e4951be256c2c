"""The CPU's plain-loop lane tables (ENTMAX_CPU_PORTABLE=1, and every CPU without AVX-512)
give the same results as the AVX-512 moves: both only move entries, the arithmetic is shared.

The switch is read once per process, so the portable run happens in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys

import torch

from testing import ATOL, subprocess_env

# Short rows (solved 16 at a time, one per SIMD lane) of lengths around the chunk size and
# the batch limit, at fixed and per-row alphas; forward and both gradients.
_SCRIPT = r"""
import sys
import torch
import entmax_cuda

torch.manual_seed(0)
out = {}
for n in (1, 5, 16, 17, 70, 129, 511, 512):
    x = (3 * torch.randn(37, n)).requires_grad_(True)
    for name, alpha in (("1.1", torch.tensor(1.1)), ("1.5", torch.tensor(1.5)), ("2.5", torch.tensor(2.5)),
                        ("rows", torch.linspace(1.0, 2.4, 37).reshape(37, 1))):
        alpha = alpha.clone().requires_grad_(True)
        y = entmax_cuda.entmax(x, alpha)
        dx, da = torch.autograd.grad(y, [x, alpha], torch.randn_like(y))
        out[f"{n}/{name}"] = (y.detach(), dx, da)
torch.save(out, sys.argv[1])
"""


def _run(path, portable: bool):
    env = subprocess_env()
    env.pop("ENTMAX_CPU_PORTABLE", None)
    if portable:
        env["ENTMAX_CPU_PORTABLE"] = "1"
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, and the source tree
    # of an installed wheel holds no built kernels
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], env=env, capture_output=True, text=True,
                          cwd=path.parent, timeout=300)
    assert done.returncode == 0, done.stderr
    return torch.load(path)


def test_portable_lane_tables_match_the_default_path(tmp_path):
    default = _run(tmp_path / "default.pt", portable=False)
    portable = _run(tmp_path / "portable.pt", portable=True)
    assert default.keys() == portable.keys()
    for key, (y, dx, da) in default.items():
        py, pdx, pda = portable[key]
        torch.testing.assert_close(py, y, atol=ATOL[torch.float32], rtol=0, msg=f"forward {key}")
        assert torch.equal(py == 0, y == 0), f"support differs for {key}"
        torch.testing.assert_close(pdx, dx, atol=ATOL[torch.float32], rtol=1e-5, msg=f"dx {key}")
        torch.testing.assert_close(pda, da, atol=1e-6, rtol=1e-5, msg=f"dalpha {key}")
