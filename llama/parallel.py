"""Model parallelism, applied to a model after it is built: the one place that knows how each weight splits.

llama/model.py builds a single-device model of plain nn.Linear and nn.Embedding layers. parallelize()
splits it over fairscale's model-parallel group (set up by llama.distributed.setup_model_parallel):
each splittable layer becomes fairscale's, holding this rank's part of the weight under the same
state-dict key, with the per-rank shape of Meta's shards, so one checkpoint shard loads into either.

- column-parallel (output features split, weight dim 0): wq, wk, wv, w1, w3, and output, whose
  result is gathered on every rank;
- row-parallel (input features split, weight dim 1, the input already split): wo, w2;
- the token embedding, along its embedding dimension (weight dim 1);
- the norms are whole on every rank.

With more ranks than kv heads, each rank holds a copy of the one kv head its query heads use: rank r
of world W holds kv head r // (W // n_kv_heads).
"""

from contextlib import contextmanager
from typing import Optional, Tuple

import torch
from torch import nn

from llama.distributed import model_parallel_world_size

COLUMN, ROW, EMBEDDING = "column", "row", "embedding"
# How each layer (by its last module name) splits across model-parallel ranks; others are replicated.
LAYER_SPLIT = {
    "wq": COLUMN, "wk": COLUMN, "wv": COLUMN, "w1": COLUMN, "w3": COLUMN, "output": COLUMN,
    "wo": ROW, "w2": ROW, "tok_embeddings": EMBEDDING,
}
_WEIGHT_DIM = {COLUMN: 0, ROW: 1, EMBEDDING: 1}
_GATHERED = {"output"}  # column-parallel layers whose full output every rank needs
_KV_LAYERS = {"wk", "wv"}


def split_dim(key: str) -> Optional[int]:
    """The dimension along which a state-dict tensor is split across ranks, or None if replicated."""
    kind = LAYER_SPLIT.get(key.split(".")[-2])
    return None if kind is None else _WEIGHT_DIM[kind]


def check_split(n_heads: int, n_kv_heads: int, world: int) -> None:
    """ValueError unless the heads split over world model-parallel ranks."""
    if n_heads % world or (n_kv_heads % world and world % n_kv_heads):
        raise ValueError(
            f"a model with n_heads={n_heads} and n_kv_heads={n_kv_heads} does not split over "
            f"{world} model-parallel ranks: use a number of processes that divides n_heads and divides or "
            f"is a multiple of n_kv_heads"
        )


def local_kv_heads(n_kv_heads: int, world: int) -> int:
    """The kv heads each rank holds: its share, or one copied head when there are more ranks than kv heads."""
    return max(1, n_kv_heads // world)


def rank_range(key: str, size: int, n_kv_heads: int, head_dim: int, rank: int, world: int) -> Tuple[int, int]:
    """[start, stop) of this rank's part of a split tensor, size long along split_dim(key)."""
    if key.split(".")[-2] in _KV_LAYERS and world > n_kv_heads:
        start = (rank // (world // n_kv_heads)) * head_dim
        return start, start + head_dim
    if size % world:
        raise ValueError(f"tensor {key!r} of size {size} along dim {split_dim(key)} does not split over {world} ranks")
    part = size // world
    return rank * part, (rank + 1) * part


def linear_kind(layer: nn.Module) -> Optional[Tuple[str, bool]]:
    """("none" | "column" | "row", gather_output) of a plain or fairscale linear layer; None for other modules."""
    if isinstance(layer, nn.Linear):
        return "none", False
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if isinstance(layer, ColumnParallelLinear):
        return COLUMN, layer.gather_output
    if isinstance(layer, RowParallelLinear):
        return ROW, False
    return None


@contextmanager
def _fairscale_layers():
    """fairscale's parallel layers, with their weight initialisation skipped.

    fairscale initialises a slice by building the layer's whole unsharded weight on every rank
    (and fails inside a meta-device context); checkpoint weights replace it anyway.
    """
    from fairscale.nn.model_parallel import layers

    initialize = layers._initialize_affine_weight
    layers._initialize_affine_weight = lambda *args, **kwargs: None
    try:
        yield layers
    finally:
        layers._initialize_affine_weight = initialize


def _parallel_layer(layers, name: str, layer: nn.Module, out_features: int) -> nn.Module:
    kind = LAYER_SPLIT[name]
    if kind == EMBEDDING:
        new = layers.ParallelEmbedding(layer.num_embeddings, layer.embedding_dim)
    elif kind == COLUMN:
        new = layers.ColumnParallelLinear(layer.in_features, out_features, bias=False, gather_output=name in _GATHERED)
    else:
        new = layers.RowParallelLinear(layer.in_features, layer.out_features, bias=False, input_is_parallel=True)
    # Uninitialised, on the replaced weight's device and in its dtype (fairscale allocates on the CPU).
    old = layer.weight
    new.weight = nn.Parameter(torch.empty(new.weight.shape, dtype=old.dtype, device=old.device))
    return new


def parallelize(model: nn.Module) -> nn.Module:
    """Split a Transformer over the model-parallel group: fairscale's layers in place of the plain
    splittable ones and each Attention's local head counts set. Returns the model.

    Weights are not carried over: build the model on the meta device, parallelize, then load this
    rank's part of each weight (llama.checkpoint.rank_plan). With one model-parallel rank (or no
    process group) nothing changes. Layers already parallel are kept, so a second call does nothing.
    """
    world = model_parallel_world_size()
    if world == 1:
        return model
    args = model.params
    check_split(args.n_heads, args.kv_heads, world)
    if model.cache_shape is not None:
        raise ValueError("parallelize the model before setup_cache(): the KV cache holds the local kv heads")
    n_kv = local_kv_heads(args.kv_heads, world)
    with _fairscale_layers() as layers:
        for name, layer in list(model.named_modules()):
            short = name.rpartition(".")[2]
            if short not in LAYER_SPLIT or not isinstance(layer, (nn.Linear, nn.Embedding)):
                continue
            out_features = n_kv * world * args.head_dim if short in _KV_LAYERS else getattr(layer, "out_features", None)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _parallel_layer(layers, short, layer, out_features))
    for block in model.layers:
        block.attention.n_local_heads = args.n_heads // world
        block.attention.n_local_kv_heads = n_kv
    return model
