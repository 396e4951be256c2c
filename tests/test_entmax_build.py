"""The build and loading the compiled kernels: the GPU architectures and abi3 naming, import
errors that say what to run, `python -m entmax_cuda.info`, the package's dependencies."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import entmax_cuda
from entmax_cuda import _build

from testing import REPO_ROOT


_REAL_BUILD_INFO = _build.build_info()


def _fake_build_info(**overrides):
    fields = {name: getattr(_REAL_BUILD_INFO, name) for name in _build.BUILD_INFO_FIELDS}
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def _import_failing_for(module_name: str, message: str):
    real_import = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == module_name:
            raise ImportError(message)
        return real_import(name, *args, **kwargs)

    return import_module


def test_build_info_describes_this_build():
    info = _build.build_info()
    assert _build._torch_version_tuple(torch.__version__) >= _build._torch_version_tuple(info.MIN_TORCH)
    assert isinstance(info.WITH_CUDA, bool)
    if info.WITH_CUDA:
        assert info.CUDA_ARCHS


def test_kernels_are_registered_for_the_cpu():
    assert hasattr(torch.ops.entmax_cuda, "entmax_forward")
    assert hasattr(torch.ops.entmax_cuda, "entmax_backward")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("entmax_cuda::entmax_forward", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("entmax_cuda::entmax_backward", "CPU")


def test_cuda_build_registers_cuda_kernels():
    if not _REAL_BUILD_INFO.WITH_CUDA or torch.version.cuda is None:
        pytest.skip("this build has no CUDA kernels (ENTMAX_CUDA=0), or torch is a CPU build")
    assert _build.CUDA_KERNELS_LOADED
    for op in ("entmax_forward", "entmax_backward", "attention_forward", "attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"entmax_cuda::{op}", "CUDA"), op


@pytest.mark.parametrize("version,expected", [("2.14.1+cu130", (2, 14)), ("2.10.0", (2, 10)),
                                              ("2.9.1+cpu", (2, 9)), ("3.0.0a0+git1234", (3, 0))])
def test_torch_version_parsing(version, expected):
    assert _build._torch_version_tuple(version) == expected


def test_missing_build_info_says_to_rebuild(monkeypatch):
    monkeypatch.setitem(sys.modules, "entmax_cuda._build_info", None)  # import now raises ImportError
    monkeypatch.delattr(entmax_cuda, "_build_info", raising=False)
    with pytest.raises(ImportError, match=r"not built.*pip install"):
        _build.load_library()


def test_too_old_torch_says_what_to_upgrade_and_run(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu126")
    with pytest.raises(ImportError, match=r"torch >= 2\.10.*2\.9\.1.*pip install"):
        _build.load_library()


def test_build_needing_a_newer_torch_than_this_one_is_refused(monkeypatch):
    monkeypatch.setattr(_build, "build_info", lambda: _fake_build_info(MIN_TORCH="99.0"))
    with pytest.raises(ImportError, match=r"torch >= 99\.0.*pip install"):
        _build.load_library()


def test_cuda_build_on_a_cpu_torch_loads_the_cpu_kernels_and_says_why_cuda_is_off(monkeypatch):
    monkeypatch.setattr(_build, "build_info", lambda: _fake_build_info(WITH_CUDA=True))
    monkeypatch.setattr(_build, "CUDA_KERNELS_LOADED", False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(_build.importlib, "import_module",
                        _import_failing_for("entmax_cuda._C_cuda", "must not be imported on a CPU torch"))
    _build.load_library()
    assert _build.CUDA_KERNELS_LOADED is False
    reason = _build.cuda_unavailable_reason()
    assert reason is not None and "CPU build" in reason and "CUDA build of torch" in reason


def test_build_without_cuda_says_how_to_build_it():
    if _REAL_BUILD_INFO.WITH_CUDA:
        pytest.skip("this build has CUDA kernels")
    reason = _build.cuda_unavailable_reason()
    assert reason is not None and "without CUDA" in reason and "pip install" in reason


def test_unloadable_extension_names_the_torch_it_was_built_for(monkeypatch):
    monkeypatch.setattr(_build, "build_info", lambda: _fake_build_info(TORCH_VERSION="2.10.0+cu126"))
    monkeypatch.setattr(_build.importlib, "import_module",
                        _import_failing_for("entmax_cuda._C", "undefined symbol: _ZN5torch6stable3fooEv"))
    with pytest.raises(ImportError, match=r"undefined symbol.*built against torch 2\.10\.0\+cu126.*pip install"):
        _build.load_library()


def test_unloadable_cuda_extension_says_what_to_run(monkeypatch):
    monkeypatch.setattr(_build, "build_info", lambda: _fake_build_info(WITH_CUDA=True))
    monkeypatch.setattr(_build, "CUDA_KERNELS_LOADED", False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_build.importlib, "import_module",
                        _import_failing_for("entmax_cuda._C_cuda", "libcudart.so.13: cannot open shared object"))
    with pytest.raises(ImportError, match=r"_C_cuda.*libcudart.*pip install"):
        _build.load_library()


def _env_for_this_entmax_cuda() -> dict:
    """Environment for a subprocess run outside the checkout that imports the entmax_cuda these
    tests import: the checkout only when that is where it was built in place (an installed
    package must not be shadowed by the source tree)."""
    env = dict(os.environ)
    if Path(entmax_cuda.__file__).resolve().parents[1] == REPO_ROOT:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def test_info_module_runs_and_reports_the_build(tmp_path):
    result = subprocess.run([sys.executable, "-m", "entmax_cuda.info"], cwd=tmp_path,
                            env=_env_for_this_entmax_cuda(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    info = _build.build_info()
    assert f"built against torch {info.TORCH_VERSION}" in out
    assert f"running torch          {torch.__version__}" in out
    assert "CPU kernels loaded     yes" in out
    assert "CPU threads" in out
    assert ("not built" in out) == (not info.WITH_CUDA)
    if info.WITH_CUDA:
        assert f"TORCH_CUDA_ARCH_LIST={info.CUDA_ARCHS}" in out
        assert "binaries (SASS)      " + " ".join(info.CUDA_SASS) in out
        assert "PTX (JIT, later GPUs) " + (" ".join(info.CUDA_PTX) or "none") in out
    cuda_line = next(line for line in out.splitlines() if line.startswith("CUDA kernels loaded"))
    if not info.WITH_CUDA:
        assert "no: " in cuda_line and "pip install" in cuda_line
    if torch.cuda.is_available():
        assert "GPU 0" in out and "runs the sm_" in out  # the default list has a binary for every lent GPU
    else:
        assert "GPU visible            none" in out


def test_info_runs_from_the_repository_root():
    """The documented commands run from the checkout, so `python -m entmax_cuda.info` there imports
    the source tree: it loads the kernels when they were built in place (`pip install -e .`), and
    otherwise says how to get them, without importing anything else."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "entmax_cuda.info"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    if any((REPO_ROOT / "entmax_cuda").glob("_C.*")):
        assert result.returncode == 0, result.stderr
        assert "CPU kernels loaded     yes" in result.stdout
    else:
        assert result.returncode != 0
        assert "imported from the source tree" in result.stderr and "pip install -e ." in result.stderr


# ---------------------------------------------------------------- architectures and abi3

def _setup_constant(name: str) -> str:
    """A string constant of setup.py, read without running it."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def _run_setup_logic(script: str, env_overrides: dict) -> subprocess.CompletedProcess:
    """Runs setup.py's definitions (everything before it decides and calls setup()) in a
    subprocess, then `script` against them."""
    source = (REPO_ROOT / "setup.py").read_text()
    definitions = source[:source.index("WITH_CUDA = want_cuda()")]
    program = (f"__file__ = {str(REPO_ROOT / 'setup.py')!r}\n" + definitions + "\n" + script)
    env = {k: v for k, v in os.environ.items() if k not in ("ENTMAX_CUDA", "TORCH_CUDA_ARCH_LIST")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("switch", ["", "1"])
def test_toolkit_of_another_cuda_major_than_torch_is_named(switch):
    # a CUDA 12.8 torch and a CUDA 13 toolkit: torch cannot compile the kernels with it
    script = ("import torch\n"
              "torch.version.cuda = '12.8'\n"
              "CUDA_HOME = '/opt/cuda-13'\n"
              "toolkit_cuda_major = lambda: 13\n"
              "print('WITH_CUDA', want_cuda())\n")
    result = _run_setup_logic(script, {"ENTMAX_CUDA": switch})
    assert "CUDA toolkit at /opt/cuda-13 is CUDA 13 while torch" in result.stderr
    assert "built with CUDA 12.8" in result.stderr and "CUDA_HOME" in result.stderr
    if switch == "1":
        assert result.returncode == 1 and "ENTMAX_CUDA=1, but" in result.stderr and "Traceback" not in result.stderr
    else:
        assert result.returncode == 0 and "WITH_CUDA False" in result.stdout
        assert "building the CPU kernels only" in result.stderr


def test_recorded_code_lists_follow_torchs_gencode_flags():
    result = _run_setup_logic("print(compiled_code('7.5;8.6;9.0;12.0+PTX'))", {})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(_code_lists("7.5;8.6;9.0;12.0+PTX"))


def _code_lists(arch_list: str) -> tuple[list[str], list[str]]:
    """(sm_XY binaries, compute_XY PTX) that TORCH_CUDA_ARCH_LIST asks nvcc for."""
    sass, ptx = [], []
    for arch in arch_list.split(";"):
        number = arch.removesuffix("+PTX").replace(".", "")
        sass.append(f"sm_{number}")
        if arch.endswith("+PTX"):
            ptx.append(f"compute_{number}")
    return sass, ptx


def test_default_arch_list_covers_the_gpus_in_use_with_ptx_for_the_newest():
    archs = _setup_constant("DEFAULT_CUDA_ARCHS").split(";")
    versions = [a.removesuffix("+PTX") for a in archs]
    # RTX 20/30/40/50, A100, H100/H200, B200
    assert set(versions) >= {"7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"}
    newest = max(archs, key=lambda a: tuple(int(v) for v in a.removesuffix("+PTX").split(".")))
    assert newest.endswith("+PTX")


def test_nvcc_supports_every_default_arch():
    cuda_home = next((d for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if d and
                      os.path.isfile(os.path.join(d, "bin", "nvcc"))), None)
    if cuda_home is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    listed = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                            text=True, timeout=60, check=True).stdout.split()
    sass, ptx = _code_lists(_setup_constant("DEFAULT_CUDA_ARCHS"))
    assert {code.replace("sm_", "compute_") for code in sass} | set(ptx) <= set(listed)


def _fatbin_code(path: Path) -> tuple[set[str], set[str]]:
    """(SASS, PTX) embedded in a shared object's .nv_fatbin section: each fat binary's entries
    carry a kind (1 PTX, 2 ELF) and the compute capability as a number (90, 120)."""
    data = path.read_bytes()
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    sass, ptx = set(), set()
    for name, _, _, _, offset, size in sections:
        if data[names_at + name:data.index(b"\0", names_at + name)] != b".nv_fatbin":
            continue
        pos = offset
        while pos + 16 <= offset + size:
            magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, pos)
            if magic != 0xBA55ED50:  # fat binaries are 8-byte aligned, padding between them
                pos += 8
                continue
            entry, end = pos + header_size, pos + header_size + fat_size
            while entry < end:
                kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
                arch = struct.unpack_from("<I", data, entry + 28)[0]
                (ptx if kind == 1 else sass).add(f"{'compute' if kind == 1 else 'sm'}_{arch}")
                entry += entry_header + payload
            pos = end
    return sass, ptx


def test_cuda_build_holds_the_recorded_code_for_every_arch():
    if not _REAL_BUILD_INFO.WITH_CUDA:
        pytest.skip("this build has no CUDA kernels")
    spec = importlib.util.find_spec("entmax_cuda._C_cuda")
    sass, ptx = _fatbin_code(Path(spec.origin))
    assert sass == set(_REAL_BUILD_INFO.CUDA_SASS) and ptx == set(_REAL_BUILD_INFO.CUDA_PTX)
    assert (sorted(sass), sorted(ptx)) == tuple(map(sorted, _code_lists(_REAL_BUILD_INFO.CUDA_ARCHS)))


@pytest.mark.parametrize("module", ["entmax_cuda._C", "entmax_cuda._C_cuda"])
def test_extensions_are_built_for_the_python_limited_api(module):
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"{module} is not built")
    assert spec.origin.endswith(".abi3.so")


@pytest.mark.parametrize("capability, expected", [
    ((8, 6), "the sm_86 binary"),
    ((8, 7), "the sm_86 binary"),  # same major, newer minor: binary compatible
    ((9, 0), "the sm_90 binary"),
    ((10, 3), "the sm_100 binary"),
    ((12, 1), "the sm_120 binary"),
    ((13, 0), "compute_120 PTX"),  # a later GPU JIT-compiles the newest PTX
    ((11, 0), "nothing"),  # no binary of major 11, and PTX 12.0 is newer than the GPU
    ((7, 0), "TORCH_CUDA_ARCH_LIST=7.0"),
])
def test_info_says_which_code_a_gpu_runs(capability, expected):
    from entmax_cuda.info import code_for_device

    sass, ptx = _code_lists("7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX")
    assert expected in code_for_device(capability, sass, ptx)


def test_stale_build_info_says_to_rebuild(monkeypatch):
    stale = types.ModuleType("entmax_cuda._build_info")
    for name in _build.BUILD_INFO_FIELDS[:-2]:
        setattr(stale, name, getattr(_REAL_BUILD_INFO, name))
    stale.__file__ = "_build_info.py"
    monkeypatch.setitem(sys.modules, "entmax_cuda._build_info", stale)
    monkeypatch.setattr(entmax_cuda, "_build_info", stale, raising=False)
    with pytest.raises(ImportError, match=r"older than its Python code.*CUDA_SASS, CUDA_PTX.*pip install"):
        _build.build_info()


# ---------------------------------------------------------------- dependencies

DSAN_EXTRAS = ("yaml", "tqdm", "matplotlib")


def test_import_entmax_cuda_needs_none_of_the_dsan_extras(tmp_path):
    # Every import of an extra fails as a missing package's does (ModuleNotFoundError), while
    # importlib.util.find_spec still answers (torch's own optional-dependency probes call it).
    blocker = (
        "import importlib.machinery, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {DSAN_EXTRAS!r}:\n"
        "            return importlib.machinery.ModuleSpec(name, self)\n"
        "    def create_module(self, spec):\n"
        "        raise ModuleNotFoundError('blocked: ' + spec.name, name=spec.name)\n"
        "    def exec_module(self, module):\n"
        "        pass\n"
        "sys.meta_path.insert(0, Block())\n"
        "import entmax_cuda, torch\n"
        "x = torch.randn(3, 5, requires_grad=True)\n"
        "entmax_cuda.Entmax15Loss()(x, torch.tensor([0, 1, 4])).backward()\n"
        f"assert not any(m.split('.')[0] in {DSAN_EXTRAS!r} for m in sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], cwd=tmp_path, env=_env_for_this_entmax_cuda(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_package_requires_only_torch_and_numpy_and_the_extras_are_optional():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["torch>=2.10", "numpy"]
    extras = project["optional-dependencies"]
    assert set(extras["dsan"]) == {"pyyaml", "tqdm", "matplotlib"}
    assert {"pytest", "entmax==1.3", "entmax-cuda[dsan,hf]"} <= set(extras["test"])
    assert project["scripts"]["dsan"] == "dsan.__main__:run"


def test_installed_version_is_the_packages():
    try:
        installed = importlib.metadata.version("entmax-cuda")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("entmax-cuda is not installed (an in-place build)")
    assert installed == entmax_cuda.__version__
