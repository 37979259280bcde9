"""Rewrite a checkpoint: reshard Meta's layout, convert Meta <-> Hugging Face, change dtype.

    python -m llama.convert reshard llama-2-13b llama-2-13b-mp1 --shards 1
    python -m llama.convert to_hf llama-2-7b llama-2-7b-hf --dtype bfloat16
    python -m llama.convert to_meta llama-2-7b-hf llama-2-7b-meta --shards 1

The output directory must not exist; it is written under a temporary name beside it
(.NAME.<pid>@<host>.<random>) and renamed when complete, so an interrupted run (an error, a full
disk, Ctrl-C, SIGTERM, SIGHUP) leaves nothing half-written behind; a run killed outright (SIGKILL,
a power cut) leaves its staging directory, which the next conversion to the same name removes.
The output gets the permissions of new files under the umask, like any other.
"""

import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
from tqdm import tqdm

from llama.cli import run
from llama.checkpoint import CheckpointReader, rank_plan
from llama.device import resolve_dtype
from llama.loading import open_checkpoint
from llama.model import ModelArgs

logger = logging.getLogger(__name__)


class _Signalled(BaseException):
    """SIGTERM or SIGHUP during a conversion, raised in the main thread so that the staging directory is removed.
    A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_raise() -> Iterator[None]:
    """In the block, SIGTERM and SIGHUP raise _Signalled (their default would end the process on the spot, leaving
    the staging directory). After it, the handlers are the previous ones again, and a signal that came is sent
    again to them: by default the process then ends as it would have, only later."""
    names = ("SIGTERM", "SIGHUP")  # SIGHUP does not exist on Windows
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    received = []

    def handler(signum, frame):
        if not received:  # a second one, while cleaning up, is dropped: the first is sent again after it
            received.append(signum)
            raise _Signalled(signum)

    previous = {}
    for sig in (getattr(signal, name) for name in names if hasattr(signal, name)):
        # Left alone: an ignored signal (nohup ignores SIGHUP) and a handler set outside Python.
        if signal.getsignal(sig) not in (signal.SIG_IGN, None):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    except _Signalled:
        pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if received:
        os.kill(os.getpid(), received[0])
        # Still here: the previous handler let the process go on. The output was not written; say so.
        raise InterruptedError(f"the conversion was interrupted by {signal.Signals(received[0]).name}; nothing was written")


def _staging_pattern(dst: Path) -> "re.Pattern[str]":
    """The names of dst's staging directories: .NAME.<pid>@<host>.<random>."""
    return re.compile(rf"\.{re.escape(dst.name)}\.(\d+)@(.+)\.[0-9a-f]+")


def _remove_stale_staging(dst: Path) -> None:
    """Remove the staging directories of dst that a conversion on this host left when it was killed outright."""
    pattern, host = _staging_pattern(dst), socket.gethostname()
    for path in dst.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match or match.group(2) != host or not path.is_dir() or path.is_symlink():
            continue  # another host's process may be alive: only this host's pids can be checked
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
            continue  # alive (perhaps converting to the same name right now)
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, another user's
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %s, the partial output of an earlier conversion (process %d) that was killed", path, pid)


def _is_disk_full(error: BaseException) -> bool:
    """Whether error is a writer's way of saying that the disk (or the quota) is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save's error for a short write; safetensors' names the OS error.
    text = str(error)
    return any(s in text for s in ("unexpected pos", "file write failed", "No space left on device", "os error 28"))


def _disk_full(error: BaseException, dst: Path) -> OSError:
    """The error a person reads for a full disk while writing dst: an OSError(ENOSPC) that says so, for any writer
    (torch.save's is "inline_container.cc ... unexpected pos")."""
    free = shutil.disk_usage(dst.parent).free
    full = OSError(
        f"the disk is full: writing {str(dst)!r} failed with {free / 1e9:.2f} GB free on its disk; free some space "
        f"or write to another directory (nothing was written) [{type(error).__name__}: {error}]"
    )
    full.errno = errno.ENOSPC
    return full


def _new_staging_dir(dst: Path) -> Path:
    while True:
        tmp = dst.parent / f".{dst.name}.{os.getpid()}@{socket.gethostname()}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir()  # mode 0o777 less the umask, as for any new directory (mkdtemp's would be 0o700)
            return tmp
        except FileExistsError:
            continue


@contextmanager
def _staging(dst: Path) -> Iterator[Path]:
    """A new directory beside dst that becomes dst only if the block completes; on an error, a full disk (said
    in plain words), SIGTERM or SIGHUP, it is removed."""
    if dst.exists():
        raise FileExistsError(f"{str(dst)!r} already exists; choose a new output directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(dst)
    with _signals_raise():
        tmp = _new_staging_dir(dst)
        try:
            yield tmp
            # Every file as the umask has it, whoever wrote it: the new directory's mode shows the umask
            # (os.umask would have to change it, for every thread, to read it).
            file_mode = tmp.stat().st_mode & 0o666
            for path in tmp.iterdir():
                path.chmod(file_mode)
            os.rename(tmp, dst)
        except BaseException as e:
            full = _is_disk_full(e) and _disk_full(e, dst)
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise full from e
            raise


def _resolve_vocab(reader, params: dict) -> dict:
    """params with vocab_size taken from the embedding when params.json leaves it to the tokenizer (-1)."""
    if params.get("vocab_size", -1) == -1:
        params = {**params, "vocab_size": reader.shape("tok_embeddings.weight")[0]}
    return params


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else resolve_dtype(name, torch.device("cpu"))


def _progress(tensors: int) -> tqdm:
    """The progress bar of every conversion (on stderr, when it is a terminal): tensors read and cast."""
    return tqdm(total=tensors, desc="Converting", unit="tensor", disable=None)


def _read(reader: CheckpointReader, args: ModelArgs, rank: int, world: int, dtype: Optional[torch.dtype],
          bar: tqdm) -> Dict[str, torch.Tensor]:
    """rank's part of every tensor (of world ranks), read, cast to dtype, one tensor at a time."""
    state = {}
    for key, part in rank_plan(reader, args.kv_heads, args.head_dim, rank, world).items():
        tensor = part.load()
        # clone(): a slice of a memory-mapped tensor would otherwise save its whole storage.
        state[key] = (tensor.to(dtype) if dtype is not None else tensor).clone()
        bar.update()
    return state


def _copy_tokenizer(src: Path, dst: Path) -> None:
    if (src / "tokenizer.model").is_file():
        # copyfile, not copy2: the copy gets the umask's permissions, not the source's (0o600, say).
        shutil.copyfile(src / "tokenizer.model", dst / "tokenizer.model")


def write_meta(reader, params: dict, dst: Path, shards: int, dtype: Optional[torch.dtype] = None, src: Optional[Path] = None) -> None:
    """Write Meta's layout with the given shard count, one shard in memory at a time."""
    args = ModelArgs(**params)
    if not isinstance(shards, int) or shards < 1:
        raise ValueError(f"--shards must be a positive integer, got {shards!r}")
    if args.n_heads % shards or args.kv_heads % shards:
        raise ValueError(
            f"{shards} shards do not split n_heads={args.n_heads} and n_kv_heads={args.kv_heads} evenly; "
            f"choose a divisor of {args.kv_heads} (loading then spreads any shard count over more ranks)"
        )
    with _staging(dst) as out, _progress(len(list(reader.keys())) * shards) as bar:
        (out / "params.json").write_text(json.dumps(params, indent=2))
        for rank in range(shards):
            torch.save(_read(reader, args, rank, shards, dtype, bar), out / f"consolidated.{rank:02d}.pth")
            logger.info("wrote shard %d/%d", rank + 1, shards)
        if src is not None:
            _copy_tokenizer(src, out)


def reshard(src: str, dst: str, shards: int, dtype: Optional[str] = None) -> None:
    """Rewrite a checkpoint (Meta or Hugging Face layout) as Meta's layout with `shards` shards.

    Args:
        src: The checkpoint folder to read (Meta's or Hugging Face's layout).
        dst: The folder to write; it must not exist yet.
        shards: How many consolidated.NN.pth shards to write (the model-parallel size they are split for); it must
            divide the model's heads.
        dtype: float32, float16 or bfloat16 to cast the weights to; by default they keep their dtype.
    """
    reader, params = open_checkpoint(Path(src))
    params = _resolve_vocab(reader, params)
    write_meta(reader, params, Path(dst), shards, _dtype(dtype), Path(src))


to_meta = reshard


def to_hf(src: str, dst: str, dtype: Optional[str] = None, max_shard_gb: float = 5.0) -> None:
    """Rewrite a checkpoint as a Hugging Face Llama directory (config.json + safetensors).

    Args:
        src: The checkpoint folder to read (Meta's or Hugging Face's layout).
        dst: The folder to write; it must not exist yet.
        dtype: float32, float16 or bfloat16 to cast the weights to; by default they keep their dtype.
        max_shard_gb: The largest safetensors file to write, in GB; larger models are split over several.
    """
    from llama.hf_write import save_hf

    reader, params = open_checkpoint(Path(src))
    params = _resolve_vocab(reader, params)
    args = ModelArgs(**params)
    with _staging(Path(dst)) as out, _progress(len(list(reader.keys()))) as bar:
        save_hf(_read(reader, args, 0, 1, _dtype(dtype), bar), params, out, max_shard_bytes=int(max_shard_gb * 1e9))
        _copy_tokenizer(Path(src), out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run({"reshard": reshard, "to_meta": to_meta, "to_hf": to_hf})


if __name__ == "__main__":
    main()
