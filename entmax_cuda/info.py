"""`python -m entmax_cuda.info`: how this build was made and what it runs on."""

from __future__ import annotations

import torch


def main() -> None:
    from . import _build

    info = _build.build_info()
    print(f"entmax_cuda built against torch {info.TORCH_VERSION} (CUDA {info.TORCH_CUDA_VERSION}); "
          f"valid for torch >= {info.MIN_TORCH} (LibTorch stable ABI)")
    print(f"running torch          {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"CUDA kernels           {'built, archs ' + info.CUDA_ARCHS if info.WITH_CUDA else 'not built'}")
    _build.load_library()
    reason = _build.cuda_unavailable_reason()
    print(f"CUDA kernels loaded    {'yes' if reason is None else 'no: ' + reason}")
    print(f"CPU threads            {torch.get_num_threads()} "
          f"(torch's parallel backend: {'OpenMP' if torch.backends.openmp.is_available() else 'native'})")
    gpu = torch.cuda.is_available()
    print(f"GPU visible            {torch.cuda.get_device_name(0) if gpu else 'none'}")


if __name__ == "__main__":
    main()
