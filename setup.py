"""Build script for entmax_cuda's compiled kernels (entmax_cuda._C).

Environment switches:
  ENTMAX_CUDA=1|0        force the CUDA kernels on / off (default: on when torch is a
                         CUDA build and the CUDA toolkit is found)
  TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "8.6;9.0" (default: 7.5;8.0;8.6;8.9;9.0)
  MAX_JOBS               parallel compile jobs (ninja)
  ENTMAX_DEBUG=1         -O0 -g
"""

import glob
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

import torch
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
os.chdir(ROOT)
CSRC = Path("csrc")  # relative: setuptools refuses absolute source paths when building a wheel
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0"  # RTX 20/30/40 first, A100 and H100 too
# The stable ABI subset of torch 2.10: one build stays valid for later torch releases.
TORCH_TARGET_VERSION = "0x020a000000000000"
MIN_TORCH = "2.10"


def is_toolkit(root) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit's root. torch guesses it from the nvcc on PATH, which is wrong when
    that nvcc is a wrapper script outside the toolkit: check the guess, then the usual places."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in candidates:
        if is_toolkit(root):
            return os.path.realpath(root)
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME is not None:
    os.environ["CUDA_HOME"] = CUDA_HOME
    cpp_extension.CUDA_HOME = CUDA_HOME  # read when the CUDA extension is compiled and linked


def want_cuda() -> bool:
    switch = os.environ.get("ENTMAX_CUDA", "").strip()
    if switch == "0":
        return False
    if switch == "1":
        if CUDA_HOME is None:
            sys.exit("ENTMAX_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit's root")
        if torch.version.cuda is None:
            sys.exit("ENTMAX_CUDA=1 but torch " + torch.__version__ + " is a CPU build: install a CUDA build of torch")
        return True
    if torch.version.cuda is not None and CUDA_HOME is None:
        print("entmax_cuda: torch is a CUDA build but no CUDA toolkit was found (set CUDA_HOME): "
              "building the CPU kernels only", file=sys.stderr)
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_arch_list() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch's BuildExtension
    return archs


def write_build_info(with_cuda: bool, archs: str) -> None:
    info = (
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"MIN_TORCH = {MIN_TORCH!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCHS = {archs if with_cuda else ''!r}\n"
    )
    path = ROOT / "entmax_cuda" / "_build_info.py"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(info)
    tmp.replace(path)


def extensions():
    debug = os.environ.get("ENTMAX_DEBUG", "0") == "1"
    with_cuda = want_cuda()
    archs = cuda_arch_list() if with_cuda else ""
    write_build_info(with_cuda, archs)

    opt = ["-O0", "-g"] if debug else ["-O3"]
    defines = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
    # -fopenmp-simd: honour `#pragma omp simd` (vectorised reductions) without an OpenMP runtime;
    # threads come from torch's own parallel_for. -fno-trapping-math lets the compiler if-convert
    # (and so vectorise) the selects of the hot loops; NaN/inf semantics are unchanged.
    cxx = opt + defines + ["-std=c++17", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno",
                           "-fdiagnostics-color=always"]
    # _C: schemas and CPU kernels, loadable by any torch >= 2.10, CPU or CUDA build.
    cpu_sources = [str(CSRC / f) for f in ("entmax.cpp", "cpu/entmax_cpu.cpp", "attention.cpp", "cpu/attention_cpu.cpp")]
    modules = [CppExtension("entmax_cuda._C", cpu_sources, extra_compile_args={"cxx": cxx})]
    if with_cuda:
        # _C_cuda: the CUDA kernels, loaded only when the running torch has CUDA.
        nvcc = opt + defines + ["-DUSE_CUDA", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        cuda_sources = [str(CSRC / "cuda" / "module.cpp"), str(CSRC / "cuda" / "entmax_cuda.cu")]
        modules.append(CUDAExtension("entmax_cuda._C_cuda", cuda_sources,
                                     extra_compile_args={"cxx": cxx + ["-DUSE_CUDA"], "nvcc": nvcc}))
    return modules


setup(
    packages=find_packages(include=["entmax_cuda", "entmax_cuda.*", "dsan", "dsan.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
