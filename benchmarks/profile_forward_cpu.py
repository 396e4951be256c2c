"""A fixed CPU workload for profilers: 50 fused forwards at DSAN's (512, 70, 70), one thread.

    perf record -o perf.data python benchmarks/profile_forward_cpu.py [--alpha 1.5]
    perf report -i perf.data --no-children
"""

import argparse
import time

import torch

import entmax_cuda


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alpha", type=float, default=1.5)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(512, 70, 70) * 2
    alpha = torch.full((512, 1, 1), args.alpha)
    for _ in range(3):
        entmax_cuda.entmax(x, alpha)
    start = time.perf_counter()
    for _ in range(args.calls):
        entmax_cuda.entmax(x, alpha)
    fused = (time.perf_counter() - start) / args.calls
    start = time.perf_counter()
    for _ in range(args.calls):
        torch.softmax(x, -1)
    softmax = (time.perf_counter() - start) / args.calls
    print(f"fused {fused * 1e3:.2f} ms, softmax {softmax * 1e3:.2f} ms per call (1 thread)")


if __name__ == "__main__":
    main()
