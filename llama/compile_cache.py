"""Compile once per machine: the CPU decode step as an AOTInductor package in an on-disk cache.

torch.compile's work (tracing, freezing the weights into the graph, autotuning, building C++) is lost with
the process, and inductor's own caches refuse frozen graphs. Exported and compiled ahead of time instead, the
step is a shared library with the frozen weights inside, written once under a key of everything it depends
on (the weights' bytes, the architecture, dtype, cache shape, this library's model code, torch and the CPU);
a later process with the same key loads it in seconds. The KV cache is not in it: the step takes the model's
cache tensors as inputs and reads and writes them in place.

LLAMA_COMPILE_CACHE names the directory (default ~/.cache/llama/compiled, under XDG_CACHE_HOME if set);
"off" (or "0", or empty) compiles in-process every time. The packages least recently used are removed
once the directory holds more than LLAMA_COMPILE_CACHE_GB (default 20) gigabytes: each is GBs.
"""

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

CACHE_VARIABLE = "LLAMA_COMPILE_CACHE"
SIZE_VARIABLE = "LLAMA_COMPILE_CACHE_GB"
# The code whose graph the package holds: a change to any of them is a new key.
_SOURCES = ("model.py", "quantized_linear.py", "compiled.py", "compile_cache.py")


OFF_WORDS = ("", "0", "off", "false", "no")  # values of a setting that turn it off


def user_cache_home() -> Path:
    """This library's directory in the user's cache: XDG_CACHE_HOME/llama, or ~/.cache/llama."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama"


def cache_dir() -> Optional[Path]:
    """Where compiled packages are kept, or None when LLAMA_COMPILE_CACHE turns the cache off."""
    value = os.environ.get(CACHE_VARIABLE)
    if value is not None:
        return None if value.strip().lower() in OFF_WORDS else Path(value).expanduser()
    return user_cache_home() / "compiled"


def package_key(model: torch.nn.Module, settings: Dict[str, object]) -> str:
    """A digest of everything the compiled step depends on: every weight's bytes (so a fine-tune of the same
    shape never loads another's step), the model's settings, the library's model code, torch and the CPU."""
    digest = hashlib.sha256()
    for part in (torch.__version__, platform.machine(), torch.backends.cpu.get_cpu_capability(), sorted(settings.items())):
        digest.update(repr(part).encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    for name, tensor in model.state_dict().items():  # the KV cache is not in it: not a persistent buffer
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(memoryview(tensor.detach().contiguous().cpu().view(torch.uint8).numpy()))
    return digest.hexdigest()[:32]


def load_or_compile(
    module: torch.nn.Module,
    example_inputs: tuple,
    dynamic_shapes: Sequence[Optional[dict]],
    inductor_configs: Dict[str, object],
    path: Path,
) -> Tuple[Callable, bool]:
    """The AOTInductor-compiled module from path, compiled and stored there first if it is absent or unreadable,
    and whether it was loaded (True) or compiled (False).

    The package is written under a temporary name and renamed, so a process that dies while compiling, or two
    processes compiling at once, never leave a partial package under the real name.
    """
    size_limit()  # a bad setting fails before minutes of compiling
    if path.exists():
        try:
            runner = _load(path)
            os.utime(path)  # recently used: the last to be evicted
            logger.info("loaded the compiled decode step from %s", path)
            return runner, True
        except Exception as error:  # a truncated or foreign file: compile it again
            logger.warning("could not load the compiled decode step %s (%s); compiling it again", path, error)
    logger.info("compiling the decode step ahead of time; it is kept in %s for the next process", path.parent)
    with torch.no_grad():
        exported = torch.export.export(module, example_inputs, dynamic_shapes=tuple(dynamic_shapes), strict=False)
    _drop_metadata_asserts(exported)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

        with _private_temp_dir() as build_dir, temporary_cache_dir(build_dir):  # inductor's build files: GBs
            torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs=inductor_configs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    evict(path.parent, keep=path)
    return _load(path), False


def _drop_metadata_asserts(exported: torch.export.ExportedProgram) -> None:
    """Remove the dtype/device assertions export puts after every .to(): as a second user of a matmul's result
    such an assertion keeps inductor's freezing patterns (w8a8's torch._int_mm -> oneDNN's prepacked int8 linear)
    from matching, and the tensors they check are the graph's own, whose dtypes cannot change."""
    graph = exported.graph_module.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
    exported.graph_module.recompile()


def _load(path: Path) -> Callable:
    # The loader unpacks the package (GBs) under TMPDIR and removes it only when the runner is destroyed,
    # which a process ending seldom does: unpack into a directory of our own, removed once loaded (the
    # shared library and the weights stay mapped).
    with _private_temp_dir():
        return torch._inductor.aoti_load_package(str(path))


@contextmanager
def _private_temp_dir():
    """A new directory, TMPDIR for native code (and the compilers it runs) until the block ends; then removed."""
    directory = tempfile.mkdtemp(prefix="llama-compile-")
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = directory
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous
        shutil.rmtree(directory, ignore_errors=True)


def size_limit() -> float:
    """LLAMA_COMPILE_CACHE_GB in bytes (ValueError naming the variable if it is not a number >= 0)."""
    value = os.environ.get(SIZE_VARIABLE, "20")
    try:
        limit = float(value)
    except ValueError:
        limit = -1.0
    if not limit >= 0:
        raise ValueError(f"{SIZE_VARIABLE} must be a number of gigabytes >= 0, got {value!r}")
    return limit * 1e9


def evict(directory: Path, keep: Optional[Path] = None) -> None:
    """Remove the least recently used packages until directory holds at most LLAMA_COMPILE_CACHE_GB
    gigabytes (never keep), and partial packages of compilations that died over a day ago."""
    limit_bytes = size_limit()
    packages = []
    for entry in directory.glob("*.pt2"):
        try:
            stat = entry.stat()
        except OSError:  # removed meanwhile by another process
            continue
        if entry.name.startswith("."):
            if stat.st_mtime < time.time() - 86400:
                entry.unlink(missing_ok=True)
            continue
        packages.append((stat.st_mtime, stat.st_size, entry))
    total = sum(size for _, size, _ in packages)
    for _, size, entry in sorted(packages, key=lambda p: p[0]):
        if total <= limit_bytes:
            break
        if entry != keep:
            logger.info("removing the least recently used compiled step %s (%s is over %.1f GB)", entry, directory, limit_bytes / 1e9)
            entry.unlink(missing_ok=True)
            total -= size
