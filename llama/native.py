"""llama's own CPU matmuls for what torch has no fast form of on AVX2 CPUs, built on first use with the C++
compiler that torch.compile needs anyway, and kept once per machine (csrc/matmul_avx2.cpp):

- ``llama_cpu::int8_matmul``: int8 layers (weight-only, per-channel scales);
- ``llama_cpu::bf16_matmul``: bfloat16 models' linear layers (llama.model.Linear);
- ``llama_cpu::int8_int8_matmul``: w8a8's integer products, exactly ``torch._int_mm``'s.

On CPUs with AVX2 but not AVX-512, torch's kernels for these (``_weight_int8pack_mm`` and inductor's template for
it; its bfloat16 matmul; ``_int_mm``, a plain loop without VNNI) stream the weights at half the speed at a decode
step's rows, or far worse, and the int8 one rounds its input to bfloat16 first, which these do not (README,
"Compiled decoding and quantized weights").
A compiled decode step calls them like any other op.

LLAMA_NATIVE_KERNELS: "auto" (default) uses them where torch's best CPU code is AVX2; "on" on any CPU with AVX2
(AVX-512 ones included, for tests); "off" never builds them. The built library is kept under
XDG_CACHE_HOME/llama/native (~/.cache/llama/native), named by a digest of its source, torch and the compiler. A
failed build warns once and leaves torch's kernels.
"""

import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from functools import lru_cache
from pathlib import Path
from typing import List, Optional

import torch

from llama.compile_cache import OFF_WORDS, user_cache_home

logger = logging.getLogger(__name__)

VARIABLE = "LLAMA_NATIVE_KERNELS"
SOURCE = Path(__file__).parent / "csrc" / "matmul_avx2.cpp"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-w"]

_lock = threading.Lock()
_loaded: Optional[bool] = None  # None: not tried in this process yet


def wanted() -> bool:
    """Whether LLAMA_NATIVE_KERNELS and this CPU call for the native kernels (whether they build is another matter)."""
    value = os.environ.get(VARIABLE, "auto").strip().lower()
    if value in OFF_WORDS:
        return False
    if value not in ("auto", "on", "1", "true", "yes"):
        raise ValueError(f"{VARIABLE}={value!r} is not a setting: use 'auto' (the default), 'on' or 'off'")
    capability = _cpu_capability()
    if value == "auto":
        return capability == "AVX2"
    return capability.startswith(("AVX2", "AVX512"))


@lru_cache(maxsize=None)
def _cpu_capability() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "not x86"
    return torch.backends.cpu.get_cpu_capability()


def ready() -> bool:
    """Whether llama's native kernels serve int8, w8a8 and bfloat16 linear layers on CPU in this process: wanted
    here, and built and loaded (built by the first call on this machine, in seconds)."""
    global _loaded
    if not wanted():
        return False
    if _loaded is not None:  # decided: no lock on the layers' hot path
        return _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
    return _loaded


def _registered() -> bool:
    """Whether the op is already registered in this process (by this module, or a library loaded before)."""
    return all(hasattr(torch.ops.llama_cpu, op) for op in ("int8_matmul", "bf16_matmul", "int8_int8_matmul"))


def _load() -> bool:
    if _registered():
        return True
    try:
        library = build()
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"building llama's native CPU kernels failed ({error}); int8, w8a8 and bfloat16 layers use torch's kernels. "
                      f"Set {VARIABLE}=off to skip the attempt.", RuntimeWarning, stacklevel=3)
        return False
    torch.library.register_fake("llama_cpu::int8_matmul")(lambda x, weight, scales: _output_like(x, weight))
    torch.library.register_fake("llama_cpu::bf16_matmul")(_output_like)
    torch.library.register_fake("llama_cpu::int8_int8_matmul")(
        lambda xq, q: xq.new_empty(xq.shape[0], q.shape[0], dtype=torch.int32))
    return True


def _output_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An op's output for tracing (torch.compile, export): x's shape with weight.shape[0] features."""
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def build(directory: Optional[Path] = None) -> Path:
    """The kernels' shared library, compiled into directory (default: the user cache's llama/native) unless a build
    of the same source, torch and compiler is there. Written under a temporary name and renamed, so two processes
    building at once, or one killed while building, never leave a partial library."""
    compiler = os.environ.get("CXX") or "g++"
    command = [compiler, *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}", *_torch_flags()]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, version, command):
        digest.update(repr(part).encode())
    directory = directory or user_cache_home() / "native"
    target = directory / f"matmul_avx2-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("building llama's native CPU kernels into %s (once per machine)", target)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / target.name
        done = subprocess.run([*command, str(SOURCE), "-o", str(built), *_torch_libraries()], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-400:]}")
        os.replace(built, target)
    return target


def _torch_flags() -> List[str]:
    from torch.utils import cpp_extension

    return [f"-I{path}" for path in cpp_extension.include_paths()]


def _torch_libraries() -> List[str]:
    from torch.utils import cpp_extension

    paths = cpp_extension.library_paths()
    return [*(f"-L{p}" for p in paths), *(f"-Wl,-rpath,{p}" for p in paths), "-lc10", "-ltorch_cpu"]
