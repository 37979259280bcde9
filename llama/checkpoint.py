"""Reading Meta-layout Llama 2 checkpoints (params.json and consolidated.NN.pth shards), cutting from
any checkpoint reader the slice of each tensor that one model-parallel rank holds, whatever the shard
count, and the one loop that loads planned tensors into a model (load_weights)."""

import json
import math
import pickle
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Protocol, Tuple

import torch
from torch import nn
from tqdm import tqdm

from llama.parallel import rank_range, split_dim

# Present in some Llama 2 files; the model computes its own rotary table.
IGNORED_KEYS = {"rope.freqs"}
_INT_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"}
_FLOAT_PARAMS = {"ffn_dim_multiplier", "norm_eps", "rope_theta"}
_NULLABLE_PARAMS = {"n_kv_heads", "ffn_dim_multiplier"}
_PARAMS_FROM_FILE = _INT_PARAMS | _FLOAT_PARAMS
_REQUIRED_PARAMS = {"dim", "n_layers", "n_heads"}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as it is."""


class CheckpointReader(Protocol):
    """Whole (unsharded) tensors of a checkpoint in Meta's names, read lazily, part by part."""

    def keys(self) -> Iterable[str]: ...

    def shape(self, key: str) -> Tuple[int, ...]: ...

    def read(self, key: str, dim: Optional[int], start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) along dim of the whole tensor (all of it when dim is None)."""


_SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth")
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def require_regular_file(path: Path) -> None:
    """CheckpointError if path exists but is not a regular file (a symlink to one is fine).

    Checked before opening: opening a FIFO blocks until something writes to it, forever, and a device never ends.
    A missing path passes: the callers say what is missing in their own words.
    """
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return
    except OSError as e:  # a symlink loop, no permission
        raise CheckpointError(f"{str(path)!r} cannot be read: {e.strerror}") from e
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a plain file")
        raise CheckpointError(f"{str(path)!r} is {kind}, not a regular file; put the real file in its place")


def checkpoint_shards(ckpt_dir: Path) -> List[Path]:
    """The consolidated.NN.pth files of ckpt_dir in rank order, 00 to the last with none missing."""
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(ckpt_dir)!r} does not exist; pass --ckpt_dir llama-2-7b (the folder download.sh made)")
    files = sorted(ckpt_dir.glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"no *.pth checkpoint files in {str(ckpt_dir)!r}; is the download complete?")
    # Only consolidated.NN.pth is a shard: any other .pth (a backup, a copy) would be read as one more rank.
    others = [p.name for p in files if not _SHARD_NAME.fullmatch(p.name)]
    if others:
        raise CheckpointError(
            f"{str(ckpt_dir)!r} holds {', '.join(map(repr, others))} beside its shards; only consolidated.NN.pth "
            f"files are shards: move {'it' if len(others) == 1 else 'them'} out of the checkpoint directory"
        )
    shards = sorted(files, key=lambda p: int(_SHARD_NAME.fullmatch(p.name).group(1)))
    missing = sorted(set(range(len(shards))) - {int(_SHARD_NAME.fullmatch(p.name).group(1)) for p in shards})
    if missing:
        raise CheckpointError(
            f"{str(ckpt_dir)!r} has {len(shards)} shards but no consolidated.{missing[0]:02d}.pth; the shards must be "
            f"numbered 00 to {len(shards) - 1:02d} (is the download complete?)"
        )
    return shards


def load_params(ckpt_dir: Path) -> dict:
    """The model hyperparameters of params.json, checked for names and types."""
    path = ckpt_dir / "params.json"
    require_regular_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is missing; every Llama 2 checkpoint folder has one")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(params, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(params).__name__}")
    unknown = set(params) - _PARAMS_FROM_FILE
    missing = _REQUIRED_PARAMS - set(params)
    if unknown or missing:
        raise CheckpointError(
            f"{str(path)!r}: " + "; ".join(
                ([f"unknown keys {sorted(unknown)}"] if unknown else [])
                + ([f"missing keys {sorted(missing)}"] if missing else [])
            ) + f" (known: {sorted(_PARAMS_FROM_FILE)})"
        )
    for key, value in params.items():
        if value is None and key in _NULLABLE_PARAMS:
            continue
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if key in _INT_PARAMS:
            # vocab_size may be -1: "take it from the tokenizer".
            ok = is_int and (value >= 1 or (key == "vocab_size" and value == -1))
        else:
            ok = (is_int or isinstance(value, float)) and value > 0
        if not ok:
            kind = "positive integer" if key in _INT_PARAMS else "positive number"
            raise CheckpointError(f"{str(path)!r}: {key}={value!r} must be a {kind}")
    check_float_params(params, repr(str(path)))
    return params


# The ranges in which these hyperparameters mean anything: outside them decoding goes silently wrong (a rope_theta
# below 1 or of Infinity loses position information; an overflowing norm_eps flattens every activation).
_FLOAT_RANGES = {"rope_theta": (1.0, 1e12), "norm_eps": (1e-12, 0.1), "ffn_dim_multiplier": (1e-9, 100.0)}


def check_float_params(params: dict, where: str) -> None:
    """CheckpointError if rope_theta, norm_eps or ffn_dim_multiplier (when set) is not finite or outside its range."""
    for key, (low, high) in _FLOAT_RANGES.items():
        value = params.get(key)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise CheckpointError(f"{where}: {key}={value!r} must be a finite number from {low:g} to {high:g}")


_LAYER_KEY = re.compile(r"layers\.(\d+)\.")


def check_params_match(reader: CheckpointReader, params: dict, where: str) -> None:
    """CheckpointError where the hyperparameters (params.json's names, from the file named by where) disagree
    with what the checkpoint's tensor names and shapes say at no cost: the number of layers and dim.

    Checked before the model is built: a wrong n_layers or dim in the file would otherwise build that
    model (a million layers, say) before the weights' names and shapes are compared.
    """
    keys = list(reader.keys())
    layers = {int(m.group(1)) for m in map(_LAYER_KEY.match, keys) if m}
    found = {"layers": max(layers) + 1 if layers else 0}
    if "tok_embeddings.weight" in keys:
        found["dim"] = reader.shape("tok_embeddings.weight")[1]
    for name, key in (("layers", "n_layers"), ("dim", "dim")):
        if name in found and params[key] != found[name]:
            said = f"{params[key]} layers" if name == "layers" else f"dim {params[key]}"
            raise CheckpointError(
                f"{where} has {said}, the checkpoint {found[name]}; the file does not belong to these weights: "
                f"use the one that came with them"
            )


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-map a shard without running pickle code: tensors page in from disk as they are used."""
    require_regular_file(path)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{str(path)!r} needs pickle code to load, which is refused for safety (weights_only=True): {e}"
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} must hold a dict of tensors (a state dict)")
    return state


class MetaCheckpoint:
    """The consolidated.NN.pth shards of a directory, seen as whole tensors.

    Shards are memory-mapped: read() touches only the shards, and the bytes, its range covers.
    """

    def __init__(self, ckpt_dir: Path):
        self.paths = checkpoint_shards(ckpt_dir)
        self.shards = [load_shard(p) for p in self.paths]
        first = self.shards[0]
        for path, shard in zip(self.paths[1:], self.shards[1:]):
            if set(shard) != set(first):
                odd = sorted(set(shard) ^ set(first))[:4]
                raise CheckpointError(f"{str(path)!r} holds different tensors from {str(self.paths[0])!r}: {odd}")
            for key, tensor in shard.items():
                if tensor.shape != first[key].shape:
                    raise CheckpointError(
                        f"{str(path)!r}: tensor {key!r} has shape {tuple(tensor.shape)}, but "
                        f"{tuple(first[key].shape)} in {str(self.paths[0])!r}; the shards are from different models"
                    )

    def keys(self) -> List[str]:
        return [k for k in self.shards[0] if k not in IGNORED_KEYS]

    def shape(self, key: str) -> Tuple[int, ...]:
        shape = list(self.shards[0][key].shape)
        dim = split_dim(key)
        if dim is not None and len(self.shards) > 1:
            shape[dim] *= len(self.shards)
        return tuple(shape)

    def read(self, key: str, dim: Optional[int], start: int, stop: int) -> torch.Tensor:
        if dim is None or split_dim(key) is None:
            return self.shards[0][key]
        size = self.shards[0][key].shape[dim]
        parts = []
        for n, shard in enumerate(self.shards):
            lo, hi = max(start, n * size), min(stop, (n + 1) * size)
            if lo < hi:
                parts.append(shard[key].narrow(dim, lo - n * size, hi - lo))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


@dataclass(frozen=True)
class TensorSlice:
    """Elements [start, stop) along dim (everything when dim is None) of one tensor of a checkpoint, not yet read."""

    reader: CheckpointReader
    key: str
    dim: Optional[int]
    start: int = 0
    stop: int = 0

    @property
    def shape(self) -> Tuple[int, ...]:
        shape = list(self.reader.shape(self.key))
        if self.dim is not None:
            shape[self.dim] = self.stop - self.start
        return tuple(shape)

    def load(self) -> torch.Tensor:
        return self.reader.read(self.key, self.dim, self.start, self.stop)


def rank_plan(reader: CheckpointReader, n_kv_heads: int, head_dim: int, rank: int, world: int) -> Dict[str, TensorSlice]:
    """This rank's part of every tensor (llama.parallel decides which): its 1/world of each split
    dimension, or with more ranks than kv heads the one kv head its query heads use; norms whole."""
    plan = {}
    for key in reader.keys():
        dim = split_dim(key)
        if dim is None:
            plan[key] = TensorSlice(reader, key, None)
            continue
        try:
            start, stop = rank_range(key, reader.shape(key)[dim], n_kv_heads, head_dim, rank, world)
        except ValueError as e:
            raise CheckpointError(str(e)) from e
        plan[key] = TensorSlice(reader, key, dim, start, stop)
    return plan


def rank_slices(reader: CheckpointReader, n_kv_heads: int, head_dim: int, rank: int, world: int) -> Dict[str, torch.Tensor]:
    """rank_plan's slices, read."""
    return {k: s.load() for k, s in rank_plan(reader, n_kv_heads, head_dim, rank, world).items()}


class StateDictReader:
    """A dict of whole tensors (a memory-mapped state dict, say) as a CheckpointReader."""

    def __init__(self, state: Dict[str, torch.Tensor]):
        self.state = state

    def keys(self) -> List[str]:
        return list(self.state)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.state[key].shape)

    def read(self, key: str, dim: Optional[int], start: int, stop: int) -> torch.Tensor:
        tensor = self.state[key]
        return tensor if dim is None else tensor.narrow(dim, start, stop - start)


def whole_plan(reader: CheckpointReader) -> Dict[str, TensorSlice]:
    """Every tensor of reader, whole."""
    return {key: TensorSlice(reader, key, None) for key in reader.keys()}


# --- loading planned tensors into a model ---------------------------------------------------------


class LoadHook:
    """What load_weights does with each tensor beyond casting it into place; this base class does nothing
    more. Quantization (llama.quantize) hooks in here: it replaces layers as their weights are read."""

    description = "Loading weights"

    def expected_shapes(self, model: nn.Module) -> Dict[str, Tuple[int, ...]]:
        """The name and (per-rank) shape of every tensor the plan must hold."""
        return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}

    def take(self, model: nn.Module, key: str, tensor: torch.Tensor) -> bool:
        """Make tensor (as read) part of the model; False leaves it to load_weights, which casts and assigns it."""
        return False


def load_weights(model: nn.Module, plan: Dict[str, TensorSlice], source: Path, device: torch.device,
                 dtype: torch.dtype, hook: Optional[LoadHook] = None, progress: bool = False) -> int:
    """Read each planned tensor and make it the model's: the hook's way, else moved to device and dtype.

    Checks names and shapes first, so nothing is half-loaded. One slice at a time is read, so on
    the way to a GPU the host holds little more than one tensor. The model may live on the meta
    device. source names the checkpoint in errors. Returns the bytes read.
    """
    hook = hook or LoadHook()
    plan = {k: v for k, v in plan.items() if k not in IGNORED_KEYS}
    _check_plan(source, hook.expected_shapes(model), {k: s.shape for k, s in plan.items()})
    state, bytes_read = {}, 0
    for key, tensor_slice in tqdm(plan.items(), desc=hook.description, unit="tensor", disable=not progress or None, leave=False):
        tensor = tensor_slice.load()
        bytes_read += tensor.nbytes
        if not hook.take(model, key, tensor):
            state[key] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=False)  # _check_plan made sure nothing is missing
    return bytes_read


def _check_plan(source: Path, expected: Dict[str, Tuple[int, ...]], shapes: Dict[str, Tuple[int, ...]]) -> None:
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{str(source)!r} does not match the model of params.json: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, shape in shapes.items():
        if tuple(shape) != tuple(expected[key]):
            raise CheckpointError(
                f"{str(source)!r}: tensor {key!r} has shape {tuple(shape)} but params.json and the "
                f"model-parallel size give {tuple(expected[key])}"
            )
