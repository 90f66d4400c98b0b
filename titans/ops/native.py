"""The chunk path's per-piece work and the layer's input and output paths in C++ (csrc/chunk_native.cpp), built on first use;
and, as a module of its own (`step_module`), the decode step (csrc/step_native.cpp, layers/decode.py).

The Python functions they replace (chunk.piece_forward, chunk.advance_state,
chunk_backward.piece_backward, chunk.chunk_gates and chunk_gates_backward, the elementwise part
of chunk.KeptInternals.expand, and the forward and backward of features.qkv_features and
features.gated_rms_norm) stay the readable definition and the fallback; the tests compare the
two. What the C++ does differently is only how: the elementwise chains fused into single loops,
the passes over the state (its update, the backward's chunk end) fused into one each, and no
Python between the products. The arithmetic is the same up to rounding.

Build: the source is compiled against the installed torch (its headers and libraries) with the
system C++ compiler (`c++`, or $CXX), `-O3 -march=native -fopenmp`, the first time it is needed
(about 25 s), into ~/.cache/titans (or $TITANS_CACHE), keyed by the source, torch's version, the
compiler, the flags and the CPU. It links the OpenMP runtime torch has already loaded, so
`torch.set_num_threads` holds. Without a compiler, off Linux/x86-64, or with TITANS_NATIVE=0,
`available()` is False and the op runs its Python code; a failed build warns once and does the same.
The native path covers CPU fp32 states with the SiLU memory activation (the default); anything else
takes the Python path.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["available", "features_available", "module", "step_module"]

_CSRC = Path(__file__).with_name("csrc")
_SOURCE = _CSRC / "chunk_native.cpp"
_NAME = "_titans_chunk_native"
# the decode step (layers/decode.py), a module of its own: a generation never waits for the chunk path's build
_STEP_SOURCE, _STEP_NAME = _CSRC / "step_native.cpp", "_titans_step_native"
# -ffp-contract=off: no fused multiply-adds, so that an elementwise chain rounds exactly as the
# same chain of torch operations (the backward's kept internals are rebuilt by torch operations and
# must equal what the forward computed, bit for bit)
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_modules: dict[str, ModuleType | None] = {}


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))}))


def _command(cxx: str, source: Path, target: Path, name: str) -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    from torch.utils import cpp_extension   # here, not at import: it loads setuptools (~0.2 s of start-up)

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    libs = cpp_extension.library_paths()
    return [cxx, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DTORCH_EXTENSION_NAME={name}",
            "-DTORCH_API_INCLUDE_EXTENSION_H", *(f"-I{p}" for p in includes), str(source), "-o", str(target),
            *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs),
            "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]


def _build(source: Path, name: str) -> ModuleType | None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None or platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    src = source.read_bytes()
    key = hashlib.sha256(b"\0".join([src, torch.__version__.encode(), cxx.encode(), " ".join(_FLAGS).encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("TITANS_CACHE", Path.home() / ".cache" / "titans"))
    target = cache / f"{name}-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # compile to a temporary name and rename: concurrent first uses never load a partial file
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            subprocess.run(_command(cxx, source, partial, name), check=True, capture_output=True, timeout=600)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    loader = importlib.machinery.ExtensionFileLoader(name, str(target))
    spec = importlib.util.spec_from_file_location(name, str(target), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _load(source: Path, name: str, what: str) -> ModuleType | None:
    if name not in _modules:
        _modules[name] = None
        if os.environ.get("TITANS_NATIVE", "1") != "0":
            try:
                _modules[name] = _build(source, name)
            except (OSError, ImportError, subprocess.SubprocessError) as e:
                detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[-500:]
                warnings.warn(f"titans: the C++ {what} could not be built ({e}) {detail}; using the Python one",
                              RuntimeWarning, stacklevel=4)
    return _modules[name]


def module() -> ModuleType | None:
    """The compiled chunk path and input/output paths (built on the first call), or None when it cannot be had."""
    return _load(_SOURCE, _NAME, "chunk path")


def step_module() -> ModuleType | None:
    """The compiled decode step (csrc/step_native.cpp), or None when it cannot be had."""
    return _load(_STEP_SOURCE, _STEP_NAME, "decode step")


def available(activation: str, *tensors: torch.Tensor) -> bool:
    """True when the native chunk path applies: SiLU memory, CPU fp32 tensors, and the module built."""
    return (activation == "silu" and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and module() is not None)


def features_available(*tensors: torch.Tensor | None) -> bool:
    """True when the native input path (features.qkv_features) applies: CPU fp32 or bf16 tensors."""
    return (all(t is None or (t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16))
                for t in tensors) and module() is not None)
