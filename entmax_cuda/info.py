"""`python -m entmax_cuda.info`: how this build was made and what it runs on."""

from __future__ import annotations

import torch


def _code_number(code: str) -> tuple[int, int]:
    """'sm_86' / 'compute_120' -> (8, 6) / (12, 0)."""
    digits = code.split("_")[1]
    return int(digits[:-1]), int(digits[-1])


def code_for_device(capability: tuple[int, int], sass, ptx) -> str:
    """Which of the built GPU code a device of this compute capability runs: a binary (SASS) of
    its major version and a minor version not above its own, else PTX of a capability not
    above its own (JIT-compiled by the driver at first use), else none."""
    binaries = [c for c in sass if _code_number(c)[0] == capability[0] and _code_number(c) <= capability]
    if binaries:
        return f"the {max(binaries, key=_code_number)} binary"
    portable = [c for c in ptx if _code_number(c) <= capability]
    if portable:
        return f"{max(portable, key=_code_number)} PTX, compiled by the driver at first use"
    return (f"nothing: no code was built for compute capability {capability[0]}.{capability[1]} "
            f"(rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]})")


def main() -> None:
    from . import _build

    info = _build.build_info()
    print(f"entmax_cuda built against torch {info.TORCH_VERSION} (CUDA {info.TORCH_CUDA_VERSION}); "
          f"valid for torch >= {info.MIN_TORCH} (LibTorch stable ABI) and Python >= 3.10 (abi3)")
    print(f"running torch          {torch.__version__} (CUDA {torch.version.cuda})")
    _build.load_library()
    print("CPU kernels loaded     yes")
    if info.WITH_CUDA:
        print(f"CUDA kernels           built for TORCH_CUDA_ARCH_LIST={info.CUDA_ARCHS}")
        print(f"  binaries (SASS)      {' '.join(info.CUDA_SASS)}")
        print(f"  PTX (JIT, later GPUs) {' '.join(info.CUDA_PTX) or 'none'}")
    else:
        print("CUDA kernels           not built")
    reason = _build.cuda_unavailable_reason()
    print(f"CUDA kernels loaded    {'yes' if reason is None else 'no: ' + reason}")
    print(f"CPU threads            {torch.get_num_threads()} "
          f"(torch's parallel backend: {'OpenMP' if torch.backends.openmp.is_available() else 'native'})")
    if not torch.cuda.is_available():
        print("GPU visible            none")
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        runs = code_for_device(capability, info.CUDA_SASS, info.CUDA_PTX) if info.WITH_CUDA else "no CUDA kernels"
        print(f"GPU {index}                  {torch.cuda.get_device_name(index)} "
              f"(compute capability {capability[0]}.{capability[1]}): runs {runs}")


if __name__ == "__main__":
    main()
