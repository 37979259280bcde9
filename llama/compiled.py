"""The torch.compile'd one-token decode step, set up for the device it runs on.

CUDA: mode="reduce-overhead", so a step replays as one CUDA graph with no per-kernel launch cost.
CPU: inductor with freezing: the weights become constants of the graph, prepacked for the matmul kernel
that is fastest at the row counts of decoding. For float32 weights on AVX-512 CPUs that is oneDNN's,
packed for a batch of 8 rows; for float32 on other CPUs, bfloat16/float16 (AMX) and the quantized layers it
is inductor's C++ GEMM template (max-autotune), asked for alone, since autotuning times the choices with
every weight hot in cache, not as decoding reads them; for matmuls the template cannot do (int4 weights on
CPUs without AVX-512, for one) the step is compiled again with torch's own kernels as well. README's
benchmark tables compare them. Attention on CPU is SDPA's math form, which inductor fuses into the step;
with oneDNN's matmuls it is flex_attention instead, so that each row reads its own keys only.

Freezing keeps its own prepacked copy of the weights: on CPU the compiled step costs one more copy
of the model's matmul weights in memory (the eager weights still serve prefill), and it does not
see later in-place changes to the weights. Every graph compiled holds such a copy, so one graph
serves every batch size: the batch dimension is compiled as dynamic. torch.compile always specialises
a size of 1, so there a batch of one is padded to two rows; the ahead-of-time package takes it as it is.
One exception: a model with weight-only quantized layers gets a second package for steps of one row,
since inductor's template has its small-batch kernels for those layers only when the batch is fixed.

On CPU in a single process the step is compiled ahead of time and kept on disk (llama/compile_cache.py),
so only the first process on a machine pays for compiling; CUDA (CUDA graphs) and model parallelism
(fairscale's collectives) compile in-process with torch.compile.
"""

import logging
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, Iterator, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask

from llama import compile_cache, native
from llama.distributed import model_parallel_world_size
from llama.model import KVCache, Part, Transformer
from llama.quantized_linear import QuantizedLinear, native_int8_layers

logger = logging.getLogger(__name__)


ONEDNN_PACKED_ROWS = 8  # float32 on CPU: oneDNN's prepacked weights suit 1 to 32 rows best packed for 8


def _template_quantized(model: Transformer) -> bool:
    """Whether the model has int8 or int4 layers that keep their input in floating point (not w8a8) and are
    multiplied by torch's kernels, which inductor's GEMM template replaces (not by llama's native int8 kernel)."""
    return any(isinstance(m, QuantizedLinear) and not m.scheme.activations and not m.native_int8 for m in model.modules())


def _onednn_matmuls(model: Transformer) -> bool:
    """Whether the CPU step's matmuls go to oneDNN rather than inductor's C++ template: for a float32 model with no
    quantized layers, on a CPU with AVX-512, where oneDNN was the faster; on AVX2-only CPUs the template was
    (README's side-by-side step times for both)."""
    quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return model.tok_embeddings.weight.dtype == torch.float32 and not quantized and avx512


def row_block_mask(row_ends: torch.Tensor, bsz: int, kv_len: int, block: int) -> BlockMask:
    """flex_attention's mask for a decode step of bsz rows over kv_len keys: row i attends keys 0..row_ends[i]
    (clamped to kv_len - 1), and its blocks of keys past that are never read, where a dense mask reads every row to
    kv_len. row_ends has an entry per cache slot, a fixed size: the mask function reads it, and torch 2.13's
    ahead-of-time compiler cannot declare a tensor captured there whose size is the dynamic batch."""
    n_blocks = (kv_len + block - 1) // block
    ends = row_ends[:bsz].clamp(max=kv_len - 1)
    full = ((ends + 1) // block).to(torch.int32)  # blocks the row sees whole
    partial = ((ends + 1) % block != 0).to(torch.int32)  # then one seen in part: the block at index full
    blocks = torch.arange(n_blocks, dtype=torch.int32, device=row_ends.device)
    # Built without broadcasting a dimension of n_blocks, which export would then guard as never being 1.
    full_indices = blocks.repeat(bsz, 1)
    partial_indices = torch.zeros(bsz, n_blocks, dtype=torch.int32, device=row_ends.device) + full.clamp(max=n_blocks - 1)[:, None]

    def up_to_row_end(b, h, q_idx, kv_idx):
        return kv_idx <= row_ends[b]

    return BlockMask.from_kv_blocks(partial[:, None, None], partial_indices[:, None, None], full[:, None, None],
                                    full_indices[:, None, None], BLOCK_SIZE=block, mask_mod=up_to_row_end,
                                    seq_lengths=(1, kv_len), compute_q_blocks=False)  # (for backward only)


class _InputCache(KVCache):
    """A KV cache whose tensors are the step's inputs (not buffers), so a package compiled from it holds none."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        torch.nn.Module.__init__(self)
        self.k, self.v = k, v


@contextmanager
def _layer_caches(model: Transformer, caches: list) -> Iterator[None]:
    """Each layer's attention.cache is caches[i] inside the block, and the model's own again after it."""
    attentions = [layer.attention for layer in model.layers]
    own = [attention.cache for attention in attentions]
    try:
        for attention, cache in zip(attentions, caches):
            attention.cache = cache
        yield
    finally:
        for attention, cache in zip(attentions, own):
            attention.cache = cache


class _StepOverKeys(torch.nn.Module):
    """model.forward for one token per row, attending to key_slots.shape[0] cache positions: the attended
    length comes in as the length of a tensor, the way a size can be marked dynamic. row_ends holds each
    row's position, padded to one entry per cache slot (row_block_mask). cache, when given, is every layer's
    keys and values (k0, v0, k1, v1, ...), read and written in place instead of the model's cache buffers:
    what the ahead-of-time package is exported with, so that it does not store the cache."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.device_type = model.tok_embeddings.weight.device.type
        self.attention_block: Optional[int] = None  # keys per flex_attention block; None: SDPA, rows read to kv_len

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, key_slots: torch.Tensor, row_ends: torch.Tensor,
                *cache: torch.Tensor) -> torch.Tensor:
        inputs = [_InputCache(k, v) for k, v in zip(cache[0::2], cache[1::2])]
        kv_len = key_slots.shape[0]
        block_mask = None
        if self.attention_block:
            block_mask = row_block_mask(row_ends, tokens.shape[0], kv_len, self.attention_block)
        # On CPU, one query per row: inductor fuses SDPA's math form into the step, which beats the CPU
        # flash kernel's per-call overhead at these sizes.
        with _layer_caches(self.model, inputs) if cache else nullcontext(), \
                sdpa_kernel(SDPBackend.MATH) if self.device_type == "cpu" else nullcontext():
            return self.model.forward_parts([Part(tokens, positions, kv_len=kv_len, block_mask=block_mask)])[0][:, -1]


class CompiledDecodeStep:
    """Call as step(tokens (bsz, 1), positions (bsz, 1), kv_len) for model.forward(tokens, positions,
    kv_len=...)[:, -1]: row i in cache slot i. The first call compiles (seconds to a minute).

    The step attends to the cache up to kv_len rounded up to a multiple of kv_bucket, not to the whole
    cache: a short generation in a model built for long contexts reads only the keys it needs. The
    attended length is a dynamic size of the one compiled graph. On CPU any length costs nothing more,
    so the bucket is small; on CUDA a CUDA graph is recorded for each length met, at most
    max_seq_len / kv_bucket of them. Within that length, a float32 step on CPU (oneDNN's matmuls) reads each
    row's keys up to the row's own position only (flex_attention, in blocks of attention_block keys);
    the others read every row's keys to the longest row's.
    """

    kv_bucket: Optional[int] = None  # None: 32 on CPU, 256 elsewhere
    attention_block: Optional[int] = 64  # where the step attends with flex_attention (see __init__); None: never

    def __init__(self, model: Transformer):
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self._module = _StepOverKeys(model)
        self.kv_bucket = self.kv_bucket or (32 if self.device.type == "cpu" else 256)
        self._step: Callable = torch.compile(self._module.forward, mode="reduce-overhead" if self.device.type == "cuda" else None)
        # On CPU: "CPP" (the template), widened to "CPP,ATEN" when it cannot do every matmul; "" for oneDNN's.
        self._gemm_backends = "" if _onednn_matmuls(model) else "CPP"
        # With oneDNN's matmuls (float32), attention by flex_attention: each row reads its own keys only, not
        # every key up to the longest row's. Under max-autotune (the GEMM template) inductor's flex template
        # refuses the step's fused output conversion, and in bfloat16 it was no faster than SDPA's math form.
        block = self.attention_block
        if block and self.device.type == "cpu" and not self._gemm_backends and model.params.max_seq_len - 1 > block:
            self._module.attention_block = block
        self._key_slots: Dict[int, torch.Tensor] = {}
        # Ahead of time, kept on disk: CPU in one process only (see the module docstring).
        single = self.device.type == "cpu" and model_parallel_world_size() == 1
        self._package_dir = compile_cache.cache_dir() if single else None
        self._packages: Dict[tuple, Callable] = {}  # by (cache shape, GEMM backends, one_row)
        # How each kind of step (any rows, one row) was compiled, in words, once it has run: see routes.
        self._routes: Dict[str, str] = {}
        self._aot_failure: Optional[str] = None
        # inductor's GEMM template multiplies a weight-only quantized layer with a kernel for small batches only
        # when the batch size is fixed and under 5 (for a dynamic one it takes AMX's or a large-batch blocking),
        # so a step of one row gets a package of its own there: one more copy of the quantized weights, for a
        # faster batch-1 decode (README, "Compiled decoding and quantized weights").
        self.one_row_package = _template_quantized(model)

    def _key_slots_for(self, kv_len: int) -> torch.Tensor:
        # Generation never needs all max_len positions: the token at the last one is generated, never fed
        # back. Stopping one short keeps every attended slice of the cache non-contiguous, one case for
        # the compiler (the whole cache, a contiguous slice, would be compiled again).
        max_len = self.model.params.max_seq_len
        if kv_len < max_len:
            # export guards flex_attention's block mask as having two blocks or more (one would be another graph)
            kv_len = max(kv_len, (self._module.attention_block or 0) + 1)
            kv_len = min(max_len - 1, -(-kv_len // self.kv_bucket) * self.kv_bucket)
        if kv_len not in self._key_slots:
            self._key_slots[kv_len] = torch.empty(kv_len, device=self.device)
        slots = self._key_slots[kv_len]
        if kv_len < max_len and max_len - 1 > self.kv_bucket:  # more than one length: a dynamic size
            torch._dynamo.maybe_mark_dynamic(slots, 0)
        return slots

    def _inductor_options(self):
        # Freezing happens when the step is traced, which happens inside a call: the options are set around
        # every call, not process-wide, so other torch.compile users in the process are not affected.
        import torch._inductor.config as inductor_config

        if self.device.type != "cpu":
            # A CUDA graph is recorded for each batch size and attended length met: expected, not worth a warning.
            quiet = hasattr(inductor_config.triton, "cudagraph_dynamic_shape_warn_limit")  # not in every torch
            return inductor_config.patch({"triton.cudagraph_dynamic_shape_warn_limit": None} if quiet else {})
        return inductor_config.patch(self._cpu_configs())

    def _cpu_configs(self) -> Dict[str, object]:
        if not self._gemm_backends:
            return {"freezing": True}
        return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": self._gemm_backends}

    @torch.no_grad()  # freezing applies only to graphs traced without autograd
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: Optional[int] = None) -> torch.Tensor:
        """kv_len: attend to at least the first kv_len cache positions (default: all); above every position."""
        key_slots = self._key_slots_for(self.model.params.max_seq_len if kv_len is None else kv_len)
        bsz = tokens.shape[0]
        try:
            return self._run(tokens, positions, key_slots)[:bsz]
        except Exception as error:
            if self.device.type != "cpu" or self._gemm_backends != "CPP" or "NoValidChoicesError" not in repr(error):
                raise
            logger.info("inductor's C++ GEMM template cannot do every matmul of this model; compiling with torch's kernels as well")
            self._gemm_backends = "CPP,ATEN"
            return self._run(tokens, positions, key_slots)[:bsz]

    @property
    def routes(self) -> str:
        """How the steps run so far were compiled, e.g. "ahead of time, loaded from the compile cache" or "in this
        process (compiling ahead of time failed: ...)": a benchmark prints it, since the in-process fallback only
        warns and is slower on CPU (a batch of one runs as two rows). Empty before the first step."""
        return "; ".join(f"{kind}: {route}" if len(self._routes) > 1 else route for kind, route in self._routes.items())

    def _in_process_reason(self) -> str:
        if self._aot_failure is not None:
            return f"compiling ahead of time failed: {self._aot_failure}"
        if self.device.type != "cpu":
            return self.device.type
        if model_parallel_world_size() > 1:
            return "model parallel"
        return f"{compile_cache.CACHE_VARIABLE} is off"

    @staticmethod
    def _kind(one_row: bool) -> str:
        """The kind of step a route is recorded under: its package's (one row, or any number of rows)."""
        return "one row" if one_row else "any rows"

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, key_slots: torch.Tensor) -> torch.Tensor:
        one_row = self.one_row_package and tokens.shape[0] == 1
        if self._package_dir is not None:
            try:
                package = self._ahead_of_time(tokens, positions, key_slots, one_row=one_row)
            except Exception as error:
                if "NoValidChoicesError" in repr(error):
                    raise
                logger.warning("compiling the decode step ahead of time failed (%s); compiling it in this process instead", error)
                self._package_dir = None
                self._aot_failure = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            else:
                return package(tokens, positions, key_slots, self._row_ends(positions), *self._cache_tensors())
        # In the process one graph serves every row count, a single row included.
        self._routes.setdefault(self._kind(False), f"in this process ({self._in_process_reason()})")
        tokens, positions = self._one_graph_rows(tokens, positions)
        with self._inductor_options():
            return self._step(tokens, positions, key_slots, self._row_ends(positions))

    def _row_ends(self, positions: torch.Tensor) -> torch.Tensor:
        """Each row's position (the last key it attends), padded to one entry per cache slot (row_block_mask)."""
        ends = positions.new_zeros(self.model.cache_shape[0])
        ends[: positions.shape[0]] = positions[:, 0]
        return ends

    def _one_graph_rows(self, tokens: torch.Tensor, positions: torch.Tensor):
        """The step's inputs for torch.compile, which specialises a size of 1: a batch of one gets a second row (in
        slot 1 at the last cache position, which no sequence reads before writing it; its logits are dropped),
        and the batch size is marked dynamic, so that one graph serves every batch size."""
        slots = self.model.cache_shape[0]
        if slots >= 2:
            if tokens.shape[0] == 1:
                tokens = torch.cat([tokens, torch.zeros_like(tokens)])
                positions = torch.cat([positions, torch.full_like(positions, self.model.params.max_seq_len - 1)])
            if slots > 2:
                torch._dynamo.maybe_mark_dynamic(tokens, 0)
                torch._dynamo.maybe_mark_dynamic(positions, 0)
        return tokens, positions

    def _ahead_of_time(self, tokens: torch.Tensor, positions: torch.Tensor, key_slots: torch.Tensor, one_row: bool) -> Callable:
        """The package for this model, cache shape and GEMM backends, for any number of rows or (one_row) for one
        row only; it takes the KV cache as inputs."""
        made_for = (self.model.cache_shape, self._gemm_backends, one_row)
        if made_for not in self._packages:
            slots, max_len = self.model.cache_shape
            # The sizes that vary are the ones _one_graph_rows marks dynamic for torch.compile; exported from an
            # example of several rows, the package serves a single row as it is (no padding row).
            batch = {0: torch.export.Dim("batch", min=1, max=slots)} if slots >= 2 and not one_row else None
            min_keys = max(2, (self._module.attention_block or 0) + 1)  # _key_slots_for
            keys = {0: torch.export.Dim("keys", min=min_keys, max=max_len - 1)} if max_len - 1 > self.kv_bucket else None
            settings = {"args": repr(self.model.params), "cache": self.model.cache_shape, "kv_bucket": self.kv_bucket,
                        "gemm": self._gemm_backends, "attention_block": self._module.attention_block, "one_row": one_row,
                        "native": (native.ready(), native_int8_layers(self.model))}  # a package calls the ops it was made with
            path = self._package_dir / f"decode-{compile_cache.package_key(self.model, settings)}.pt2"
            if batch is not None:  # oneDNN packs the weights for the example's row count
                rows = min(slots, ONEDNN_PACKED_ROWS)
                tokens = tokens.new_zeros(rows, 1)
                positions = positions.new_full((rows, 1), max_len - 1)
            cache, row_ends = self._cache_tensors(), self._row_ends(positions)
            # Exported without its cache buffers: the inputs stand in for them.
            with _layer_caches(self.model, [None] * len(self.model.layers)):
                self._packages[made_for], loaded = compile_cache.load_or_compile(
                    self._module, (tokens, positions, key_slots, row_ends, *cache),
                    (batch, batch, keys, None, (None,) * len(cache)),
                    self._cpu_configs(), path
                )
            self._routes[self._kind(one_row)] = \
                f"ahead of time, {'loaded from' if loaded else 'compiled into'} the compile cache"
        return self._packages[made_for]

    def _cache_tensors(self) -> list:
        """The model's current KV cache (setup_cache() may have made new tensors), as the package takes it."""
        return [t for layer in self.model.layers for t in (layer.attention.cache.k, layer.attention.cache.v)]
