"""Writing Hugging Face Llama directories (config.json + *.safetensors) from Meta state dicts: what
`python -m llama.convert to_hf` and the benchmarks' baselines write. Reading them is llama/hf.py, which
also holds the name map and the per-head row order both directions share."""

import json
import re
from pathlib import Path
from typing import Dict, List, Tuple, Union

import torch

from llama.checkpoint import IGNORED_KEYS
from llama.hf import SAFETENSORS_INDEX, rotary_kind, meta_rows_to_hf, meta_to_hf_name, params_from_config
from llama.model import ModelArgs

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # as Hugging Face's save_pretrained


def config_from_params(params: dict, vocab_size: int, dtype: torch.dtype, max_position_embeddings: int = 4096) -> dict:
    """A Hugging Face LlamaForCausalLM config.json for params.json's hyperparameters."""
    known = {f for f in ModelArgs.__dataclass_fields__} - {"max_batch_size", "max_seq_len"}
    args = ModelArgs(**{k: v for k, v in params.items() if k in known})
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _hf_order(key: str) -> Tuple:
    """Sort key: embeddings, then layer by layer, then the final norm and the output (as HF writes them)."""
    m = re.match(r"^layers\.(\d+)\.", key)
    if m:
        return (1, int(m.group(1)), key)
    return (0 if key == "tok_embeddings.weight" else 2, 0, key)


def save_hf(
    state: Dict[str, torch.Tensor],
    params: dict,
    out_dir: Union[str, Path],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    *,
    max_position_embeddings: int = 4096,
) -> Path:
    """Write whole Meta-named tensors and params.json's hyperparameters as a Hugging Face Llama directory.

    Writes config.json and model.safetensors, or model-0000N-of-0000M.safetensors with
    model.safetensors.index.json when the weights exceed max_shard_bytes. wq and wk rows are put in
    Hugging Face's per-head order; everything else is written as it is (same dtype, same bits).
    A vocab_size of -1 in params is taken from the embedding.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = {k: v for k, v in state.items() if k not in IGNORED_KEYS}
    config = _checked_config(state, params, max_position_embeddings)
    head_dim = config["head_dim"]

    keys = sorted(state, key=_hf_order)
    hf_names = {key: meta_to_hf_name(key) for key in keys}  # refuses unknown names before writing anything
    for key in keys:
        if rotary_kind(key) is not None and state[key].shape[0] % head_dim:
            raise ValueError(f"{key} has {state[key].shape[0]} rows, not whole heads of {head_dim}")

    shards = _shards(state, keys, max_shard_bytes)

    def stored(key: str) -> torch.Tensor:
        """The tensor as Hugging Face stores it: its own contiguous CPU copy (safetensors refuses shared memory)."""
        t = state[key].detach().cpu()
        return meta_rows_to_hf(t, head_dim).contiguous() if rotary_kind(key) else t.contiguous().clone()

    out.mkdir(parents=True, exist_ok=True)
    # Weight files of an earlier conversion into this directory would be read with (or instead of) these.
    for stale in [out / SAFETENSORS_INDEX, out / "model.safetensors", *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    names = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, shard in zip(names, shards):  # one shard's copies in memory at a time
        save_file({hf_names[key]: stored(key) for key in shard}, str(out / file), metadata={"format": "pt"})
        weight_map.update({hf_names[key]: file for key in shard})
    if len(shards) > 1:
        total = sum(state[key].nbytes for key in keys)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _checked_config(state: Dict[str, torch.Tensor], params: dict, max_position_embeddings: int) -> dict:
    """config.json for state and params; ValueError where they disagree or a Llama config cannot express them."""
    if "tok_embeddings.weight" not in state:
        raise ValueError("state has no tok_embeddings.weight")
    vocab_size = params.get("vocab_size", -1)
    embed_rows = state["tok_embeddings.weight"].shape[0]
    if vocab_size in (-1, None):
        vocab_size = embed_rows
    elif vocab_size != embed_rows:
        raise ValueError(f"params vocab_size={vocab_size} but tok_embeddings.weight has {embed_rows} rows")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise ValueError(f"state mixes dtypes {sorted(map(str, dtypes))}; convert it to one dtype first")
    config = config_from_params(params, vocab_size, dtypes.pop(), max_position_embeddings)
    params_from_config(config, "the config to write")  # refuses what a Llama config cannot express
    return config


def _shards(state: Dict[str, torch.Tensor], keys: List[str], max_shard_bytes: int) -> List[List[str]]:
    """keys in order, cut into files of at most max_shard_bytes (a larger tensor gets a file of its own)."""
    shards: List[List[str]] = [[]]
    size = 0
    for key in keys:
        if shards[-1] and size + state[key].nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += state[key].nbytes
    return shards
