"""Compile once per machine: the CPU decode step as an AOTInductor package in an on-disk cache.

torch.compile's work (tracing, freezing the weights into the graph, autotuning, building C++) is lost with
the process, and inductor's own caches refuse frozen graphs. Exported and compiled ahead of time instead, the
step is a shared library with the frozen weights inside, written once under a key of everything it depends
on (the weights' bytes, the architecture, dtype, cache shape, this library's model code, torch and the CPU);
a later process with the same key loads it in seconds. The KV cache is not baked in: the loaded step is
pointed at the model's own cache tensors, which it reads and writes in place.

LLAMA_COMPILE_CACHE names the directory (default ~/.cache/llama/compiled, under XDG_CACHE_HOME if set);
"off" (or "0", or empty) compiles in-process every time.
"""

import hashlib
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

CACHE_VARIABLE = "LLAMA_COMPILE_CACHE"
# The code whose graph the package holds: a change to any of them is a new key.
_SOURCES = ("model.py", "quantized_linear.py", "compiled.py", "compile_cache.py")


def cache_dir() -> Optional[Path]:
    """Where compiled packages are kept, or None when LLAMA_COMPILE_CACHE turns the cache off."""
    value = os.environ.get(CACHE_VARIABLE)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false", "no") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama" / "compiled"


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
) -> Callable:
    """The AOTInductor-compiled module from path, compiled and stored there first if it is absent or unreadable.

    The package is written under a temporary name and renamed, so a process that dies while compiling, or two
    processes compiling at once, never leave a partial package under the real name.
    """
    if path.exists():
        try:
            runner = torch._inductor.aoti_load_package(str(path))
            logger.info("loaded the compiled decode step from %s", path)
            return runner
        except Exception as error:  # a truncated or foreign file: compile it again
            logger.warning("could not load the compiled decode step %s (%s); compiling it again", path, error)
    logger.info("compiling the decode step ahead of time; it is kept in %s for the next process", path.parent)
    with torch.no_grad():
        exported = torch.export.export(module, example_inputs, dynamic_shapes=tuple(dynamic_shapes), strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        torch._inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs=inductor_configs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return torch._inductor.aoti_load_package(str(path))
