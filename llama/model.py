"""The Llama 2 transformer, numerically equal to Meta's reference.

Layers are fairscale's model-parallel ones when the model-parallel group has more
than one rank, and plain torch layers otherwise; both hold the same state-dict
keys and shapes per rank, so one checkpoint shard loads into either.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from llama.distributed import model_parallel_world_size


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: take it from the tokenizer
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    max_batch_size: int = 32
    max_seq_len: int = 2048

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


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


def _column_linear(in_features: int, out_features: int, gather_output: bool) -> nn.Module:
    """A linear layer whose output features are split across model-parallel ranks."""
    if model_parallel_world_size() == 1:
        return nn.Linear(in_features, out_features, bias=False)
    with _fairscale_layers() as layers:
        return layers.ColumnParallelLinear(in_features, out_features, bias=False, gather_output=gather_output)


def _row_linear(in_features: int, out_features: int) -> nn.Module:
    """A linear layer whose input features are split across model-parallel ranks."""
    if model_parallel_world_size() == 1:
        return nn.Linear(in_features, out_features, bias=False)
    with _fairscale_layers() as layers:
        return layers.RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True)


def _embedding(num_embeddings: int, embedding_dim: int) -> nn.Module:
    """A token embedding whose embedding dimension is split across model-parallel ranks."""
    if model_parallel_world_size() == 1:
        if torch.get_default_device().type == "meta":
            # Skip the random initialisation: on the meta device it imports torch._dynamo
            # (seconds of start-up and ~70 MB), and checkpoint weights replace it anyway.
            return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
        return nn.Embedding(num_embeddings, embedding_dim)
    with _fairscale_layers() as layers:
        return layers.ParallelEmbedding(num_embeddings, embedding_dim)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, then cast back before the weight, as the reference does.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_table(head_dim: int, max_positions: int, theta: float = 10000.0) -> torch.Tensor:
    """cos and sin of position * theta^(-2i/head_dim), shape (max_positions, head_dim // 2, 2), float32."""
    # Built on the CPU (also inside a meta-device context) and moved to the activations' device on use.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x (bsz, seqlen, heads, head_dim).

    table is rope_table() at the sequence's positions: (seqlen, head_dim // 2, 2), or
    (bsz, seqlen, head_dim // 2, 2) when each row has positions of its own.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    table = table if table.dim() == 4 else table[None]
    cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer: (batch slots, kv heads, positions, head_dim).

    Rows are batch slots, so a sequence can be written to and read from its own slot.
    """

    def __init__(self, max_batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (bsz, kv heads, seqlen, head_dim) at start_pos; return all keys and values so far."""
        bsz, _, seqlen, _ = k.shape
        end = start_pos + seqlen
        self.k[:bsz, :, start_pos:end] = k
        self.v[:bsz, :, start_pos:end] = v
        return self.k[:bsz, :, :end], self.v[:bsz, :, :end]

    def write_rows(
        self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new position per row (row i at positions[i]) from k, v (bsz, kv heads, 1, head_dim);
        return the keys and values of those rows at positions 0..kv_len-1. Shapes do not depend on the positions."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[rows, :, positions] = k[:, :, 0]
        self.v[rows, :, positions] = v[:, :, 0]
        return self.k[: k.shape[0], :, :kv_len], self.v[: v.shape[0], :, :kv_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world = model_parallel_world_size()
        self.n_local_heads = args.n_heads // world
        # With more ranks than kv heads, each rank holds a copy of the one kv head its query heads use.
        self.n_local_kv_heads = max(1, args.kv_heads // world)
        self.head_dim = args.head_dim
        kv_dim = self.n_local_kv_heads * world * self.head_dim
        self.wq = _column_linear(args.dim, args.n_heads * self.head_dim, gather_output=False)
        self.wk = _column_linear(args.dim, kv_dim, gather_output=False)
        self.wv = _column_linear(args.dim, kv_dim, gather_output=False)
        self.wo = _row_linear(args.n_heads * self.head_dim, args.dim)
        self.cache: Optional[KVCache] = None

    def forward(
        self, x: torch.Tensor, start_pos: Union[int, torch.Tensor], rope: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """start_pos: where x's first position goes in the cache, or one position per row (decode steps)."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if isinstance(start_pos, torch.Tensor):  # a position per row; the mask spans the keys to attend
            k, v = self.cache.write_rows(start_pos, k, v, mask.shape[-1])
        elif self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        # Without a mask, several queries are a prompt from position 0: is_causal lets SDPA pick its fused kernels.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and seqlen > 1,
            enable_gqa=self.n_local_kv_heads != self.n_local_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = _column_linear(dim, hidden_dim, gather_output=False)
        self.w2 = _row_linear(hidden_dim, dim)
        self.w3 = _column_linear(dim, hidden_dim, gather_output=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self, x: torch.Tensor, start_pos: Union[int, torch.Tensor], rope: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 2. forward(tokens, start_pos) runs tokens (bsz, seqlen) at positions start_pos.. and
    returns float32 logits (bsz, seqlen, vocab), reading and extending the KV cache."""

    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError(f"ModelArgs.vocab_size must be set to the tokenizer's size, got {params.vocab_size}")
        world = model_parallel_world_size()
        if params.n_heads % params.kv_heads:
            raise ValueError(f"n_heads={params.n_heads} must be a multiple of n_kv_heads={params.kv_heads}")
        if params.n_heads % world or (params.kv_heads % world and world % params.kv_heads):
            raise ValueError(
                f"a model with n_heads={params.n_heads} and n_kv_heads={params.kv_heads} does not split over "
                f"{world} model-parallel ranks: use a number of processes that divides n_heads and divides or "
                f"is a multiple of n_kv_heads"
            )
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = _embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = _column_linear(params.dim, params.vocab_size, gather_output=True)
        # A plain attribute, not a buffer, so that model.half() or .to(dtype) keep it float32.
        # Twice max_seq_len, as in the reference, so positions past it still have angles.
        self.rope = rope_table(params.head_dim, params.max_seq_len * 2, params.rope_theta)

    def setup_cache(self, max_batch_size: Optional[int] = None, max_seq_len: Optional[int] = None) -> None:
        """(Re)allocate the KV cache on the weights' device and dtype."""
        weight = self.tok_embeddings.weight
        batch = max_batch_size or self.params.max_batch_size
        seq = max_seq_len or self.params.max_seq_len
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(batch, attn.n_local_kv_heads, seq, attn.head_dim, weight.dtype, weight.device)

    def _cache_fits(self, bsz: int, end: int) -> bool:
        cache = self.layers[0].attention.cache if self.layers else None
        weight = self.tok_embeddings.weight
        return (
            cache is not None
            and cache.k.device == weight.device
            and cache.k.dtype == weight.dtype
            and bsz <= cache.k.shape[0]
            and end <= cache.k.shape[2]
        )

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool = False) -> torch.Tensor:
        """last_only=True returns the last position's logits only (bsz, 1, vocab), skipping the output
        layer for the others: the next token needs nothing else."""
        bsz, seqlen = tokens.shape
        end = start_pos + seqlen
        if end > self.params.max_seq_len or bsz > self.params.max_batch_size:
            raise ValueError(
                f"positions up to {end} at batch {bsz} exceed the model's max_seq_len={self.params.max_seq_len} "
                f"or max_batch_size={self.params.max_batch_size}"
            )
        if not self._cache_fits(bsz, end):
            self.setup_cache()
        h = self.tok_embeddings(tokens)
        if self.rope.device != h.device:
            self.rope = self.rope.to(h.device)
        rope = self.rope[start_pos:end]
        mask = None  # one query sees the whole cache; a prompt from position 0 is plain causal attention
        if seqlen > 1 and start_pos > 0:
            # Query i sits at position start_pos + i and sees every cached key up to it.
            mask = torch.ones(seqlen, end, dtype=torch.bool, device=h.device).tril(diagonal=start_pos)
        for layer in self.layers:
            h = layer(h, start_pos, rope, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: Optional[int] = None) -> torch.Tensor:
        """One new token per row, row i at its own position positions[i]: tokens (bsz, 1), positions (bsz,).

        Returns float32 logits (bsz, vocab). Attention spans the first kv_len positions of the cache
        (all of it by default; every position must be below kv_len) under a mask, so shapes do not
        depend on the positions (torch.compile and CUDA graphs capture one step for all), and each row
        is a batch slot at its own point in its sequence.
        """
        if not self._cache_fits(tokens.shape[0], self.params.max_seq_len):
            self.setup_cache()
        cache_len = self.layers[0].attention.cache.k.shape[2]
        if kv_len is None:
            kv_len = cache_len
        elif not 1 <= kv_len <= cache_len:
            raise ValueError(f"kv_len={kv_len} must be between 1 and the cache's length {cache_len}")
        h = self.tok_embeddings(tokens)
        if self.rope.device != h.device:
            self.rope = self.rope.to(h.device)
        rope = self.rope[positions][:, None]
        mask = (torch.arange(kv_len, device=h.device)[None, :] <= positions[:, None])[:, None, None, :]
        for layer in self.layers:
            h = layer(h, positions, rope, mask)
        return self.output(self.norm(h))[:, -1].float()
