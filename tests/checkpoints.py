"""Tiny random Llama 2 checkpoints in Meta's layout (params.json + consolidated.NN.pth), for tests."""

import json
from pathlib import Path
from typing import Dict, Optional

import torch

# How Meta's shards split each tensor across model-parallel ranks (None: replicated).
SPLIT_DIM = {
    "tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1,
    "w1": 0, "w3": 0, "w2": 1, "output": 0, "attention_norm": None, "ffn_norm": None, "norm": None,
}


def tiny_params(vocab_size: int, n_kv_heads: Optional[int] = None, **overrides) -> dict:
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": vocab_size}
    if n_kv_heads is not None:
        params["n_kv_heads"] = n_kv_heads
    params.update(overrides)
    return params


def ffn_hidden(params: dict) -> int:
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    m = params["multiple_of"]
    return m * ((hidden + m - 1) // m)


def random_state_dict(params: dict, seed: int = 0, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Full (unsharded) random weights. Scales keep activations O(1) and logits peaked enough to be decisive."""
    g = torch.Generator().manual_seed(seed)
    dim, vocab = params["dim"], params["vocab_size"]
    head_dim = dim // params["n_heads"]
    kv_dim = params.get("n_kv_heads", params["n_heads"]) * head_dim
    hidden = ffn_hidden(params)

    def w(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd = {"tok_embeddings.weight": w(vocab, dim, scale=1.0)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(dim, dim)
        sd[p + "attention.wk.weight"] = w(kv_dim, dim)
        sd[p + "attention.wv.weight"] = w(kv_dim, dim)
        sd[p + "attention.wo.weight"] = w(dim, dim)
        sd[p + "feed_forward.w1.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, dim)
        sd[p + "attention_norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
        sd[p + "ffn_norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    sd["norm.weight"] = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    sd["output.weight"] = w(vocab, dim, scale=4 * dim ** -0.5)
    return sd


def split_state_dict(sd: Dict[str, torch.Tensor], n_shards: int) -> list:
    """Split full weights into n_shards model-parallel shards, as Meta's files are."""
    shards = [{} for _ in range(n_shards)]
    for key, tensor in sd.items():
        dim = SPLIT_DIM[key.split(".")[-2]]
        parts = [tensor] * n_shards if dim is None else tensor.chunk(n_shards, dim=dim)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def write_checkpoint(path: Path, params: dict, sd: Dict[str, torch.Tensor], n_shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(split_state_dict(sd, n_shards)):
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    return path
