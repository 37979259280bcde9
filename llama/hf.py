"""Hugging Face Llama directories (config.json + *.safetensors or pytorch_model*.bin), read as Meta
checkpoints; the name map and row order that llama/hf_write.py writes them with too.

The two layouts hold the same numbers under other names, except for the query and key projections:
Hugging Face's rotary embedding rotates the two halves of each head ("rotate half") where Meta's
rotates interleaved pairs, so its checkpoints reorder the rows of wq and wk within each head. For
the rows of one head, meta[2i] = hf[i] and meta[2i + 1] = hf[i + head_dim / 2].
"""

import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from llama.checkpoint import IGNORED_KEYS, CheckpointError, check_float_params, load_shard, require_regular_file
from llama.model import ModelArgs

try:  # safetensors' error type (a plain Exception subclass); older releases hide it
    from safetensors import SafetensorError
except ImportError:  # pragma: no cover
    SafetensorError = Exception

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# Hugging Face name patterns (the "model." prefix of LlamaForCausalLM may be absent, as in LlamaModel's
# own state dict) and the Meta names they become.
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(" + "|".join(map(re.escape, _LAYER_NAMES)) + r")\.weight$")
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight", "embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight",
}
_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

_META_LAYER_NAMES = {v: k for k, v in _LAYER_NAMES.items()}
_META_LAYER_RE = re.compile(r"^layers\.(\d+)\.(" + "|".join(map(re.escape, _META_LAYER_NAMES)) + r")\.weight$")
_META_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_to_meta_name(name: str) -> Optional[str]:
    """The Meta state-dict name of a Hugging Face tensor; None for buffers to skip; unknown names unchanged."""
    if _IGNORED_RE.search(name):
        return None
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return name


def meta_to_hf_name(name: str) -> str:
    """The Hugging Face (LlamaForCausalLM) name of a Meta state-dict tensor."""
    if name in _META_GLOBAL_NAMES:
        return _META_GLOBAL_NAMES[name]
    m = _META_LAYER_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a Llama 2 state-dict name; cannot give it a Hugging Face name")
    return f"model.layers.{m.group(1)}.{_META_LAYER_NAMES[m.group(2)]}.weight"


def rotary_kind(meta_name: str) -> Optional[str]:
    """'wq' or 'wk' for the weights whose rows Hugging Face reorders per head, else None."""
    kind = meta_name.split(".")[-2] if meta_name.startswith("layers.") else None
    return kind if kind in ("wq", "wk") else None


def hf_rows_to_meta(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder the rows of whole heads from Hugging Face's rotate-half layout to Meta's interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(rows // head_dim, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_rows_to_hf(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of hf_rows_to_meta."""
    rows = w.shape[0]
    return w.reshape(rows // head_dim, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def resolve_tokenizer_path(path: Union[str, Path]) -> str:
    """A tokenizer.model path: the path itself, or for a directory (a Hugging Face or Meta download) its tokenizer.model."""
    p = Path(path)
    if p.is_dir():
        model = p / "tokenizer.model"
        if not model.is_file():
            raise FileNotFoundError(
                f"{str(p)!r} is a directory without a tokenizer.model (the SentencePiece model); "
                f"pass the path of the tokenizer.model file that came with the checkpoint"
            )
        return str(model)
    return str(path)


# --- config.json -> params.json ------------------------------------------------------------------

_REQUIRED_CONFIG = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def _ffn_params(dim: int, intermediate: int, where: str) -> dict:
    """multiple_of and ffn_dim_multiplier that make ModelArgs.ffn_hidden_dim equal intermediate.

    Meta's own choices for Llama 2 7B/13B (256, None) and 70B (4096, 1.3) come first, so that a
    converted model's params.json reads as the original; then any intermediate size is matched.
    """
    base = int(2 * (4 * dim) / 3)
    candidates = [(256, None), (4096, 1.3), (intermediate, None), (intermediate, intermediate / base)]
    for multiple_of, multiplier in candidates:
        args = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
        if args.ffn_hidden_dim == intermediate:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    raise CheckpointError(f"{where}: intermediate_size={intermediate} cannot be expressed for hidden_size={dim}")


def _rope_theta(config: dict, where: str) -> float:
    """rope_theta of a config, refusing any rotary scaling (the model implements plain RoPE only)."""
    theta = config.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):  # transformers 4 / 5 names
        rope = config.get(key)
        if rope is None:
            continue
        kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else rope
        if kind != "default":
            raise CheckpointError(
                f"{where}: {key}={rope!r} is not supported; this model implements plain rotary embeddings "
                f"(Llama 2), without scaling"
            )
        theta = rope.get("rope_theta", theta)
    return 10000.0 if theta is None else theta


def params_from_config(config: dict, where: str = "config.json") -> dict:
    """params.json's hyperparameters (ModelArgs names) of a Hugging Face Llama config."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type != "llama":
        raise CheckpointError(f"{where}: model_type={model_type!r} is not supported; only Llama models (model_type 'llama') load")
    missing = [k for k in _REQUIRED_CONFIG if k not in config]
    if missing:
        raise CheckpointError(f"{where}: missing keys {missing} (a Llama config has {list(_REQUIRED_CONFIG)})")
    heads = config["num_attention_heads"]
    ints = {k: config[k] for k in _REQUIRED_CONFIG}
    ints["num_key_value_heads"] = config.get("num_key_value_heads") or heads
    for key, value in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{where}: {key}={value!r} must be a positive integer")
    floats = {"rms_norm_eps": config.get("rms_norm_eps", 1e-6), "rope_theta": _rope_theta(config, where)}
    for key, value in floats.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{where}: {key}={value!r} must be a positive number")
    dim, kv_heads = ints["hidden_size"], ints["num_key_value_heads"]
    if dim % heads or (dim // heads) % 2:
        raise CheckpointError(f"{where}: hidden_size={dim} must be num_attention_heads={heads} times an even head size")
    if config.get("head_dim") not in (None, dim // heads):
        raise CheckpointError(f"{where}: head_dim={config['head_dim']} is not hidden_size / num_attention_heads = {dim // heads}")
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={config['hidden_act']!r} is not supported (Llama uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"{where}: {key}=true is not supported (Llama 2 has no biases)")
    if config.get("sliding_window") is not None and config.get("use_sliding_window", True):
        raise CheckpointError(f"{where}: sliding_window={config['sliding_window']!r} is not supported (Llama attends to the "
                              f"whole context); a checkpoint that needs it would decode wrongly here")
    params = {
        "dim": dim, "n_layers": ints["num_hidden_layers"], "n_heads": heads, "n_kv_heads": kv_heads,
        "vocab_size": ints["vocab_size"], **_ffn_params(dim, ints["intermediate_size"], where),
        "norm_eps": float(floats["rms_norm_eps"]), "rope_theta": float(floats["rope_theta"]),
    }
    check_float_params(params, where)
    return params


# --- reading -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from e


def _weight_map(ckpt_dir: Path) -> Tuple[str, List[str], Optional[Dict[str, str]]]:
    """The weights' format ('safetensors' or 'bin'), their files, and the index's {HF tensor name: file}
    (None without an index: then every tensor of every file is the checkpoint's)."""
    for fmt, index_name, pattern in (("safetensors", SAFETENSORS_INDEX, "*.safetensors"), ("bin", BIN_INDEX, "pytorch_model*.bin")):
        path = ckpt_dir / index_name
        if path.is_file():
            index = _read_json(path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not weight_map or not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{str(path)!r} has no weight_map of tensor names to file names")
            return fmt, sorted(set(weight_map.values())), weight_map
        files = sorted(p.name for p in ckpt_dir.glob(pattern) if p.is_file())
        if files:
            return fmt, files, None
    raise CheckpointError(
        f"{str(ckpt_dir)!r} has a config.json but no weights: expected *.safetensors (with {SAFETENSORS_INDEX} "
        f"when sharded) or pytorch_model*.bin (with {BIN_INDEX} when sharded)"
    )


class HFCheckpoint:
    """A Hugging Face Llama directory seen as a Meta checkpoint: Meta's names, shapes and row order.

    Weights are read lazily: safetensors files through safe_open, slicing only the rows or columns
    asked for; .bin files memory-mapped. params holds the hyperparameters in params.json's names.
    """

    def __init__(self, ckpt_dir: Union[str, Path]):
        self.dir = Path(ckpt_dir)
        config_path = self.dir / "config.json"
        require_regular_file(config_path)
        if not config_path.is_file():
            raise FileNotFoundError(f"{str(config_path)!r} is missing; a Hugging Face model directory has one")
        self.config = _read_json(config_path)
        self.params = params_from_config(self.config, repr(str(config_path)))
        self.head_dim = self.params["dim"] // self.params["n_heads"]

        self.format, files, weight_map = _weight_map(self.dir)
        # Opening reads only headers (safetensors) or memory-maps (.bin): missing or corrupt files show up now.
        self._files = {file: self._open(file) for file in files}  # safe_open handles or memory-mapped state dicts
        names: Dict[str, str] = {}  # HF name -> file name
        if weight_map is None:
            for file in files:
                for name in self._files[file].keys():
                    if name in names:
                        raise CheckpointError(f"tensor {name!r} is in both {names[name]!r} and {file!r} in {str(self.dir)!r}")
                    names[name] = file
        else:
            held = {file: set(handle.keys()) for file, handle in self._files.items()}
            for name, file in weight_map.items():
                if name not in held[file]:
                    raise CheckpointError(f"{str(self.dir / file)!r} does not hold tensor {name!r}, which the index lists in it")
                names[name] = file

        self._sources: Dict[str, Tuple[str, str]] = {}  # Meta name -> (file, HF name)
        for name, file in names.items():
            meta = hf_to_meta_name(name)
            if meta is None or meta in IGNORED_KEYS:
                continue
            if meta in self._sources:
                raise CheckpointError(
                    f"{str(self.dir)!r}: tensors {self._sources[meta][1]!r} and {name!r} both stand for {meta!r}"
                )
            self._sources[meta] = (file, name)
        if "output.weight" not in self._sources and self.config.get("tie_word_embeddings") and "tok_embeddings.weight" in self._sources:
            self._sources["output.weight"] = self._sources["tok_embeddings.weight"]

    def _open(self, file: str):
        path = self.dir / file
        require_regular_file(path)
        if not path.is_file():
            raise CheckpointError(f"{str(path)!r} is missing; the checkpoint's index lists weights in it (incomplete download?)")
        if self.format == "bin":
            handle = load_shard(path)
        else:
            from safetensors import safe_open

            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from e
        return handle

    def keys(self) -> List[str]:
        return list(self._sources)

    def shape(self, key: str) -> Tuple[int, ...]:
        file, name = self._source(key)
        handle = self._files[file]
        if self.format == "bin":
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def _source(self, key: str) -> Tuple[str, str]:
        if key not in self._sources:
            raise KeyError(f"{str(self.dir)!r} holds no tensor {key!r}")
        return self._sources[key]

    def _read_raw(self, file: str, name: str, dim: Optional[int], start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) along dim of a stored (HF-layout) tensor, reading only those."""
        handle = self._files[file]
        try:
            if self.format == "bin":
                t = handle[name]
                return t if dim is None else t.narrow(dim, start, stop - start)
            if dim is None:
                return handle.get_tensor(name)
            part = handle.get_slice(name)
            return part[start:stop] if dim == 0 else part[(slice(None),) * dim + (slice(start, stop),)]
        except SafetensorError as e:
            raise CheckpointError(f"{str(self.dir / file)!r}: cannot read tensor {name!r}: {e}") from e

    def read(self, key: str, dim: Optional[int], start: int, stop: int) -> torch.Tensor:
        file, name = self._source(key)
        if rotary_kind(key) is None:
            return self._read_raw(file, name, dim, start, stop)
        hd = self.head_dim
        rows = self.shape(key)[0]
        if rows % hd:
            raise CheckpointError(f"{str(self.dir / file)!r}: tensor {name!r} has {rows} rows, not whole heads of {hd}")
        if dim != 0:  # the rows are all there: reorder them
            return hf_rows_to_meta(self._read_raw(file, name, dim, start, stop), hd)
        # Read the whole heads that cover [start, stop), reorder, then cut.
        lo, hi = (start // hd) * hd, -(-stop // hd) * hd
        heads = hf_rows_to_meta(self._read_raw(file, name, 0, lo, hi), hd)
        return heads if (lo, hi) == (start, stop) else heads[start - lo : stop - lo]
