"""Build script for entmax_cuda's compiled kernels (entmax_cuda._C, entmax_cuda._C_cuda).

Environment switches:
  ENTMAX_CUDA=1|0        force the CUDA kernels on / off (default: on when torch is a
                         CUDA build and the CUDA toolkit is found)
  TORCH_CUDA_ARCH_LIST   GPU architectures, e.g. "8.6;9.0" (default: DEFAULT_CUDA_ARCHS below)
  MAX_JOBS               parallel compile jobs (ninja)
  ENTMAX_DEBUG=1         -O0 -g

Both extensions use only the LibTorch stable ABI (TORCH_TARGET_VERSION) and the Python
limited API (abi3, Python >= 3.10), so one wheel serves every Python >= 3.10 and torch >= 2.10.
"""

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

import torch
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
os.chdir(ROOT)
CSRC = Path("csrc")  # relative: setuptools refuses absolute source paths when building a wheel
# The one list of GPU architectures a default build compiles: RTX 20 (7.5), A100 (8.0), RTX 30 (8.6),
# RTX 40 / L4 (8.9), H100 / H200 (9.0), B200 (10.0), RTX 50 (12.0); +PTX: later GPUs JIT-compile 12.0's PTX.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# The stable ABI subset of torch 2.10: one build stays valid for later torch releases.
TORCH_TARGET_VERSION = "0x020a000000000000"
MIN_TORCH = "2.10"
# Python limited API floor; torch's BuildExtension defines the same Py_LIMITED_API (3.10) itself.
PY_LIMITED_API_TAG = "cp310"


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


def toolkit_cuda_major():
    """The CUDA toolkit's major version, from `nvcc --version` ("release 13.0"), or None."""
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


def cxx_is_gcc() -> bool:
    """Whether the C++ compiler torch's BuildExtension runs ($CXX, else c++) is GCC."""
    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Free Software Foundation" in out and "clang" not in out.lower()


def want_cuda() -> bool:
    switch = os.environ.get("ENTMAX_CUDA", "").strip()
    if switch == "0":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        if switch == "1":
            sys.exit("ENTMAX_CUDA=1 but " + ("no CUDA toolkit was found: set CUDA_HOME to the toolkit's root"
                                             if torch.version.cuda is not None else
                                             f"torch {torch.__version__} is a CPU build: install a CUDA build of torch"))
        if torch.version.cuda is not None:
            print("entmax_cuda: torch is a CUDA build but no CUDA toolkit was found (set CUDA_HOME): "
                  "building the CPU kernels only", file=sys.stderr)
        return False
    # torch refuses to compile with a toolkit of another major version than its own.
    toolkit, torch_major = toolkit_cuda_major(), int(torch.version.cuda.split(".")[0])
    if toolkit is not None and toolkit != torch_major:
        mismatch = (f"the CUDA toolkit at {CUDA_HOME} is CUDA {toolkit} while torch {torch.__version__} was "
                    f"built with CUDA {torch.version.cuda}")
        fix = (f"point CUDA_HOME at a CUDA {torch_major} toolkit, or install a torch built for CUDA {toolkit} "
               "and build with `pip install --no-build-isolation .`")
        if switch == "1":
            sys.exit(f"ENTMAX_CUDA=1, but {mismatch}: {fix}")
        print(f"entmax_cuda: {mismatch}: building the CPU kernels only (for the GPU kernels, {fix})",
              file=sys.stderr)
        return False
    return True


def cuda_arch_list() -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch's BuildExtension
    return archs


def compiled_code(archs: str) -> tuple[list[str], list[str]]:
    """(SASS targets, PTX targets) that nvcc embeds for an arch list: from the -gencode flags
    torch derives from it, so what is recorded is what was compiled."""
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    sass, ptx = set(), set()
    for flag in cpp_extension._get_cuda_arch_flags():
        code = flag.split("code=")[-1]  # -gencode=arch=compute_90,code=sm_90 | code=compute_120
        (sass if code.startswith("sm_") else ptx).add(code)
    key = lambda code: int("".join(c for c in code.split("_")[1] if c.isdigit()))  # noqa: E731
    return sorted(sass, key=key), sorted(ptx, key=key)


def sources(*patterns: str) -> list[str]:
    """The files matching glob patterns under csrc/, sorted: a new kernel file joins the build
    by being there."""
    return sorted(str(path) for pattern in patterns for path in CSRC.glob(pattern))


def build_info_text(with_cuda: bool, archs: str) -> str:
    sass, ptx = compiled_code(archs) if with_cuda else ([], [])
    return (
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n"
        f"MIN_TORCH = {MIN_TORCH!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCHS = {archs if with_cuda else ''!r}\n"
        f"CUDA_SASS = {tuple(sass)!r}\n"
        f"CUDA_PTX = {tuple(ptx)!r}\n"
    )


class BuildKernels(BuildExtension):
    """torch's BuildExtension (ninja), plus entmax_cuda/_build_info.py written next to the
    compiled modules: into the wheel's tree, or into the source tree for in-place and
    editable builds."""

    def run(self):
        package_dir = Path(self.get_ext_fullpath("entmax_cuda._C")).parent
        package_dir.mkdir(parents=True, exist_ok=True)
        path = package_dir / "_build_info.py"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(build_info_text(WITH_CUDA, CUDA_ARCHS))
        tmp.replace(path)
        super().run()


def extensions():
    debug = os.environ.get("ENTMAX_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    defines = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
    # -fopenmp-simd: honour `#pragma omp simd` (vectorised reductions) without an OpenMP runtime;
    # threads come from torch's own parallel_for. -fno-trapping-math lets the compiler if-convert
    # (and so vectorise) the selects of the hot loops; NaN/inf semantics are unchanged.
    cxx = opt + defines + ["-std=c++17", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno",
                           "-fdiagnostics-color=always"]
    if cxx_is_gcc():
        # Keeps the root finder's branch-free step (RootFinder::step) free of branches: GCC's jump
        # threading rebuilds them from its selects, and its vectoriser then leaves the 16-row
        # batches scalar.
        cxx.append("-fno-thread-jumps")
    # _C: schemas and CPU kernels, loadable by any torch >= 2.10, CPU or CUDA build.
    # py_limited_api: abi3 (the module init uses only the limited API), named _C.abi3.so.
    modules = [CppExtension("entmax_cuda._C", sources("*.cpp", "cpu/*.cpp"), py_limited_api=True,
                            extra_compile_args={"cxx": cxx})]
    if WITH_CUDA:
        # _C_cuda: the CUDA kernels, loaded only when the running torch has CUDA.
        nvcc = opt + defines + ["-DUSE_CUDA", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        modules.append(CUDAExtension("entmax_cuda._C_cuda", sources("cuda/*.cpp", "cuda/*.cu"),
                                     py_limited_api=True,
                                     extra_compile_args={"cxx": cxx + ["-DUSE_CUDA"], "nvcc": nvcc}))
    return modules


WITH_CUDA = want_cuda()
CUDA_ARCHS = cuda_arch_list() if WITH_CUDA else ""

setup(
    packages=find_packages(include=["entmax_cuda", "entmax_cuda.*", "dsan", "dsan.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildKernels.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API_TAG}},  # the wheel's tag: cp310-abi3
)
