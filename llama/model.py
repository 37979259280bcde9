"""The Llama 2 transformer, numerically equal to Meta's reference.

The model is built for one device, of plain torch layers; llama.parallel.parallelize splits a built
model over the model-parallel group (fairscale's layers, the same state-dict keys and per-rank
shapes as Meta's shards, so one checkpoint shard loads into either).
"""

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from llama import native
from llama.memory import check_memory, rope_positions


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


_MKL = torch.backends.mkl.is_available()


# Whether llama's own CPU matmuls are in use (llama/native.py): a constant to torch.compile and export, which
# call it once while tracing instead of tracing into it.
_native_kernels = torch.compiler.assume_constant_result(native.ready)


class Linear(nn.Linear):
    """nn.Linear, except on CPU: a bfloat16 weight is multiplied by llama's own kernel where it is in use (AVX2
    CPUs; torch's bfloat16 matmul there is 2 to 5 times slower at a decode step's rows, README), eagerly and in
    compiled steps; and in eager float32 with MKL, 8 to 32 rows (a decode step's batch) are multiplied as
    weight @ x^T: for that operand order MKL's sgemm streams a weight that is not in cache faster than for
    x @ weight^T, which it handles well only for a single row or for many. Compiled and exported graphs keep
    F.linear there, which inductor matches to its own kernels."""

    def native_bf16(self) -> bool:
        """Whether this layer multiplies by llama's own bfloat16 kernel (llama/native.py)."""
        return self.weight.dtype == torch.bfloat16 and self.weight.is_cpu and self.bias is None and _native_kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_bf16():
            return torch.ops.llama_cpu.bf16_matmul(x, self.weight)
        # is_compiling() first: tracing must never compare rows, or the graph is guarded to its example's batch
        # size (export then refuses a dynamic batch whose example has 8 rows or more).
        if not torch.compiler.is_compiling() and _MKL and x.device.type == "cpu" and x.dtype == torch.float32 and self.bias is None:
            rows = x.numel() // self.in_features
            if 8 <= rows <= 32:
                return (self.weight @ x.reshape(rows, self.in_features).t()).t().reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def _linear(in_features: int, out_features: int) -> nn.Linear:
    return Linear(in_features, out_features, bias=False)


def _embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    if torch.get_default_device().type == "meta":
        # Skip the random initialisation: on the meta device it imports torch._dynamo
        # (seconds of start-up and ~70 MB), and checkpoint weights replace it anyway.
        return nn.Embedding(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim))
    return nn.Embedding(num_embeddings, embedding_dim)


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

    Each sequence lives in a slot (a row) of its own, so sequences at different points share one cache.
    """

    def __init__(self, max_batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (bsz, seqlen, kv heads, head_dim): token (i, j) at slot slots[i], position positions[i, j]."""
        rows = slots[:, None]
        self.k[rows, :, positions] = k
        self.v[rows, :, positions] = v

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot src's first length positions to slot dst."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    def read(self, slots: Optional[torch.Tensor], bsz: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at positions 0..kv_len-1 of the given slots (None: slots 0..bsz-1, read in place)."""
        if slots is None:
            return self.k[:bsz, :, :kv_len], self.v[:bsz, :, :kv_len]
        return self.k[slots, :, :kv_len], self.v[slots, :, :kv_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # The heads this device computes: all of them, until llama.parallel.parallelize splits them.
        self.n_local_heads = args.n_heads
        self.n_local_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = _linear(args.dim, args.n_heads * self.head_dim)
        self.wk = _linear(args.dim, args.kv_heads * self.head_dim)
        self.wv = _linear(args.dim, args.kv_heads * self.head_dim)
        self.wo = _linear(args.n_heads * self.head_dim, args.dim)
        self.cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, parts: Sequence["Positions"]) -> torch.Tensor:
        """x: (tokens, dim), the parts' rows one after the other; each part attends within its own rows."""
        outs, sizes = [], [at.positions.numel() for at in parts]
        for at, xq, xk, xv in zip(parts, *(_split(w(x), sizes) for w in (self.wq, self.wk, self.wv))):
            bsz, seqlen = at.positions.shape
            q = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
            k = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
            v = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
            q, k = apply_rope(q, at.rope), apply_rope(k, at.rope)
            self.cache.write(at.write_slots, at.positions, k, v)
            keys, values = self.cache.read(at.slots, bsz, at.kv_len)
            gqa = self.n_local_kv_heads != self.n_local_heads
            if at.block_mask is not None:
                # Blocks of keys the mask rules out are never read. The query is scaled first: inductor's CPU
                # template for flex_attention takes it as a plain buffer, not the rotary embedding's output.
                out = flex_attention(q.transpose(1, 2) * self.head_dim ** -0.5, keys, values, block_mask=at.block_mask,
                                     scale=1.0, enable_gqa=gqa)
            else:
                # Without a mask, the queries are a prompt from position 0: is_causal lets SDPA pick its fused kernels.
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), keys, values, attn_mask=at.mask, is_causal=at.mask is None and seqlen > 1,
                    enable_gqa=gqa,
                )
            outs.append(out.transpose(1, 2).reshape(bsz * seqlen, self.n_local_heads * self.head_dim))
        return self.wo(_cat(outs))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = _linear(dim, hidden_dim)
        self.w2 = _linear(hidden_dim, dim)
        self.w3 = _linear(dim, hidden_dim)

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

    def forward(self, x: torch.Tensor, parts: Sequence["Positions"]) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), parts)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 2. One forward path: tokens with their positions (a prompt chunk or a decode step alike)
    and the KV-cache slot of each row; setup_cache() allocates the cache once."""

    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError(f"ModelArgs.vocab_size must be set to the tokenizer's size, got {params.vocab_size}")
        if params.n_heads % params.kv_heads:
            raise ValueError(f"n_heads={params.n_heads} must be a multiple of n_kv_heads={params.kv_heads}")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = _embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = _linear(params.dim, params.vocab_size)
        # A plain attribute, not a buffer, so that model.half() or .to(dtype) keep it float32.
        check_memory(params, torch.device("cpu"), torch.float32, cache=False)
        self.rope = rope_table(params.head_dim, rope_positions(params.max_seq_len), params.rope_theta)

    def setup_cache(self, max_batch_size: Optional[int] = None, max_seq_len: Optional[int] = None) -> None:
        """Allocate the KV cache (max_batch_size slots of max_seq_len positions, by default the params')
        on the weights' device and dtype. Llama does this once; forward never allocates."""
        weight = self.tok_embeddings.weight
        batch = max_batch_size or self.params.max_batch_size
        seq = max_seq_len or self.params.max_seq_len
        if self.layers:
            caches = [layer.attention.cache for layer in self.layers if layer.attention.cache is not None]
            freed = sum(t.nbytes for c in caches for t in (c.k, c.v))  # replaced below
            check_memory(replace(self.params, max_batch_size=batch, max_seq_len=seq), weight.device, weight.dtype,
                         self.layers[0].attention.n_local_kv_heads, freed=freed)
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(batch, attn.n_local_kv_heads, seq, attn.head_dim, weight.dtype, weight.device)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first length cached positions from slot src to slot dst (its keys and values in
        every layer), so it can go on from there."""
        for layer in self.layers:
            layer.attention.cache.move(src, dst, length)

    @property
    def cache_shape(self) -> Optional[Tuple[int, int]]:
        """(slots, positions) of the KV cache, or None before setup_cache()."""
        cache = self.layers[0].attention.cache if self.layers else None
        return None if cache is None else (cache.k.shape[0], cache.k.shape[2])

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor] = 0,
        slots: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        last_only: bool = False,
        output_index: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Float32 logits (bsz, seqlen, vocab) of tokens (bsz, seqlen), writing their keys and values to the cache.

        start_pos: the position of every row's first token (Meta's call: a prompt chunk), or a tensor
        (bsz, seqlen) with each token's own position (a decode step: rows at different points).
        slots (bsz,): the cache slot of each row; None puts row i in slot i. Queries attend to the
        first kv_len positions of their slot (default: up to the last token, or the whole cache for
        tensor positions) under a causal mask by position; shapes never depend on the positions'
        values, so one compiled graph serves every decode step. last_only=True returns the last
        position's logits only (bsz, 1, vocab), skipping the output layer for the others; output_index
        (bsz,) likewise returns each row's logits at that index only (rows of different lengths, padded).
        """
        return self.forward_parts([Part(tokens, start_pos, slots, kv_len, last_only, output_index)])[0]

    @torch.no_grad()
    def forward_parts(self, parts: Sequence["Part"]) -> List[torch.Tensor]:
        """Several forward calls' worth of tokens in one: each Part is what forward() takes, and gets what
        forward() would return. The parts' rows share every matmul (one read of the weights) and attend within
        their own part, so a step's prompt chunks and its one-token decode rows run together."""
        ats = [self._positions(p.tokens, p.start_pos, p.slots, p.kv_len, p.block_mask) for p in parts]
        h = self.tok_embeddings(_cat([p.tokens.reshape(-1) for p in parts]))
        for layer in self.layers:
            h = layer(h, ats)
        picked = []
        for p, hp in zip(parts, _split(h, [p.tokens.numel() for p in parts])):
            bsz, seqlen = p.tokens.shape
            hp = hp.view(bsz, seqlen, hp.shape[-1])
            if p.last_only:
                hp = hp[:, -1:]
            elif p.output_index is not None:
                hp = hp[torch.arange(bsz, device=hp.device), p.output_index][:, None]
            picked.append(hp)
        logits = self.output(self.norm(_cat([hp.flatten(0, 1) for hp in picked]))).float()
        sizes = [hp.shape[0] * hp.shape[1] for hp in picked]
        return [out.view(*hp.shape[:2], out.shape[-1]) for out, hp in zip(_split(logits, sizes), picked)]

    def _positions(self, tokens: torch.Tensor, start_pos, slots, kv_len, block_mask=None) -> "Positions":
        if self.cache_shape is None:
            raise ValueError("the model has no KV cache: call model.setup_cache() once before forward")
        n_slots, cache_len = self.cache_shape
        bsz, seqlen = tokens.shape
        device = tokens.device
        if self.rope.device != device:
            self.rope = self.rope.to(device)
        mask = None
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos.reshape(bsz, seqlen)
            kv_len = cache_len if kv_len is None else kv_len
            # Every query sees the keys at its own position and before.
            mask = (torch.arange(kv_len, device=device) <= positions[..., None])[:, None]
            rope = self.rope[positions]
        else:
            end = start_pos + seqlen
            if end > cache_len:
                raise ValueError(
                    f"positions up to {end} exceed the KV cache's {cache_len} (max_seq_len={self.params.max_seq_len}); "
                    f"build with a larger max_seq_len"
                )
            positions = torch.arange(start_pos, end, device=device).expand(bsz, seqlen)
            kv_len = end if kv_len is None else kv_len
            if seqlen > 1 and (start_pos > 0 or kv_len != end):  # else: one query sees all, or plain causal
                mask = torch.ones(seqlen, kv_len, dtype=torch.bool, device=device).tril(diagonal=start_pos)
            rope = self.rope[start_pos:end]
        if not 1 <= kv_len <= cache_len:
            raise ValueError(f"kv_len={kv_len} must be between 1 and the cache's length {cache_len}")
        if slots is None and bsz > n_slots:
            raise ValueError(f"a batch of {bsz} rows exceeds the KV cache's {n_slots} slots (max_batch_size)")
        write_slots = torch.arange(bsz, device=device) if slots is None else slots
        return Positions(positions, write_slots, slots, kv_len, rope, None if block_mask is not None else mask, block_mask)


def _cat(tensors: List[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _split(x: torch.Tensor, sizes: List[int]) -> Sequence[torch.Tensor]:
    """x's rows in consecutive parts of the given sizes (one part: x as it is)."""
    return [x] if len(sizes) == 1 else x.split(sizes)


@dataclass
class Part:
    """The arguments of one Transformer.forward call, as a part of a forward_parts call.

    block_mask, if given, is a flex_attention BlockMask over the part's kv_len keys, used instead of the mask
    by position (it must allow the same keys): the compiled CPU decode step's, with which each row reads
    the keys up to its own position only (llama/compiled.py).
    """

    tokens: torch.Tensor
    start_pos: Union[int, torch.Tensor] = 0
    slots: Optional[torch.Tensor] = None
    kv_len: Optional[int] = None
    last_only: bool = False
    output_index: Optional[torch.Tensor] = None
    block_mask: Optional[BlockMask] = None


@dataclass
class Positions:
    """Where one forward call's tokens sit: computed once, used by every layer."""

    positions: torch.Tensor  # (bsz, seqlen)
    write_slots: torch.Tensor  # (bsz,): the cache slot of each row
    slots: Optional[torch.Tensor]  # None: rows are slots 0..bsz-1, read in place
    kv_len: int  # cache positions attended
    rope: torch.Tensor  # rotary angles: (seqlen, head_dim/2, 2) or (bsz, seqlen, head_dim/2, 2)
    mask: Optional[torch.Tensor]  # True where a query may attend; None: causal or all (or block_mask)
    block_mask: Optional[BlockMask] = None  # flex_attention's instead of mask (Part.block_mask)
