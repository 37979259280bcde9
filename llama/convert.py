"""Rewrite a checkpoint: reshard Meta's layout, convert Meta <-> Hugging Face, change dtype.

    python -m llama.convert reshard llama-2-13b llama-2-13b-mp1 --shards 1
    python -m llama.convert to_hf llama-2-7b llama-2-7b-hf --dtype bfloat16
    python -m llama.convert to_meta llama-2-7b-hf llama-2-7b-meta --shards 1

The output directory must not exist; it is written under a temporary name and renamed when
complete, so an interrupted run leaves nothing half-written behind.
"""

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

import fire
import torch

from llama.checkpoint import rank_slices
from llama.device import resolve_dtype
from llama.loading import open_checkpoint
from llama.model import ModelArgs

logger = logging.getLogger(__name__)


@contextmanager
def _staging(dst: Path) -> Iterator[Path]:
    """A temporary directory beside dst that becomes dst only if the block completes."""
    if dst.exists():
        raise FileExistsError(f"{str(dst)!r} already exists; choose a new output directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _resolve_vocab(reader, params: dict) -> dict:
    """params with vocab_size taken from the embedding when params.json leaves it to the tokenizer (-1)."""
    if params.get("vocab_size", -1) == -1:
        params = {**params, "vocab_size": reader.shape("tok_embeddings.weight")[0]}
    return params


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return None if name is None else resolve_dtype(name, torch.device("cpu"))


def _cast(state: Dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    # clone(): a slice of a memory-mapped tensor would otherwise save its whole storage.
    return {k: (v.to(dtype) if dtype is not None else v).clone() for k, v in state.items()}


def _copy_tokenizer(src: Path, dst: Path) -> None:
    if (src / "tokenizer.model").is_file():
        shutil.copy2(src / "tokenizer.model", dst / "tokenizer.model")


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
    with _staging(dst) as out:
        (out / "params.json").write_text(json.dumps(params, indent=2))
        for rank in range(shards):
            state = rank_slices(reader, args.kv_heads, args.head_dim, rank, shards)
            torch.save(_cast(state, dtype), out / f"consolidated.{rank:02d}.pth")
            logger.info("wrote shard %d/%d", rank + 1, shards)
        if src is not None:
            _copy_tokenizer(src, out)


def reshard(src: str, dst: str, shards: int, dtype: Optional[str] = None) -> None:
    """Rewrite a checkpoint (Meta or Hugging Face layout) as Meta's layout with `shards` shards."""
    reader, params = open_checkpoint(Path(src))
    params = _resolve_vocab(reader, params)
    write_meta(reader, params, Path(dst), shards, _dtype(dtype), Path(src))


to_meta = reshard


def to_hf(src: str, dst: str, dtype: Optional[str] = None, max_shard_gb: float = 5.0) -> None:
    """Rewrite a checkpoint as a Hugging Face Llama directory (config.json + safetensors)."""
    from llama.hf import save_hf

    reader, params = open_checkpoint(Path(src))
    params = _resolve_vocab(reader, params)
    args = ModelArgs(**params)
    state = _cast(rank_slices(reader, args.kv_heads, args.head_dim, 0, 1), _dtype(dtype))
    with _staging(Path(dst)) as out:
        save_hf(state, params, out, max_shard_bytes=int(max_shard_gb * 1e9))
        _copy_tokenizer(Path(src), out)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fire.Fire({"reshard": reshard, "to_meta": to_meta, "to_hf": to_hf})


if __name__ == "__main__":
    main()
