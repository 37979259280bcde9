"""Reading Meta-layout Llama 2 checkpoints: params.json and consolidated.NN.pth shards."""

import json
import pickle
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

# Present in some Llama 2 files; the model computes its own rotary table.
IGNORED_KEYS = {"rope.freqs"}
_INT_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of"}
_FLOAT_PARAMS = {"ffn_dim_multiplier", "norm_eps", "rope_theta"}
_NULLABLE_PARAMS = {"n_kv_heads", "ffn_dim_multiplier"}
_PARAMS_FROM_FILE = _INT_PARAMS | _FLOAT_PARAMS
_REQUIRED_PARAMS = {"dim", "n_layers", "n_heads"}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be loaded as it is."""


def checkpoint_shards(ckpt_dir: Path) -> List[Path]:
    """The consolidated.NN.pth files of ckpt_dir in rank order."""
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(ckpt_dir)!r} does not exist; pass --ckpt_dir llama-2-7b (the folder download.sh made)")
    shards = sorted(ckpt_dir.glob("*.pth"))
    if not shards:
        raise FileNotFoundError(f"no *.pth checkpoint files in {str(ckpt_dir)!r}; is the download complete?")
    return shards


def load_params(ckpt_dir: Path) -> dict:
    """The model hyperparameters of params.json, checked for names and types."""
    path = ckpt_dir / "params.json"
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
    return params


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-map a shard without running pickle code: tensors page in from disk as they are used."""
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


def assign_weights(model: nn.Module, state: Dict[str, torch.Tensor], source: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Move each tensor of state to device and dtype and make it the model's parameter.

    Checks names and shapes first, so nothing is half-loaded. The model may live on the meta device.
    """
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{str(source)!r} does not match the model of params.json: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{str(source)!r}: tensor {key!r} has shape {tuple(tensor.shape)} but params.json and the "
                f"model-parallel size give {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
