"""Weight-only quantization of the transformer's linear layers, run by PyTorch's own kernels.

Schemes (the ``quantize`` argument of ``Llama.build``):

- ``"int8"``: one symmetric scale per output channel; q = round(w / s) in [-127, 127] with
  s = max|w_row| / 127, and w ~= q * s. Matmul: ``torch.ops.aten._weight_int8pack_mm``.
- ``"int4"`` (= ``"int4-g128"``), ``"int4-g32"``, ``"int4-g64"``, ``"int4-g256"``: groups of that many
  consecutive input features per output channel, each with its own scale and zero (asymmetric,
  min/max): q in [0, 15] with w ~= (q - 8) * scale + zero, the layout of torch's int4 kernels.
  Matmul: ``_weight_int4pack_mm_for_cpu`` on CPU, ``_weight_int4pack_mm`` on CUDA (bfloat16 only).

On CPU the quantized matmuls compute in bfloat16 whatever the model's dtype: torch's CPU int8 and int4
kernels are vectorized only for bfloat16 inputs (their float32 and float16 paths run scalar code, 15 to
130 times slower, slower than not quantizing at all). So on CPU a quantized layer rounds its input to
bfloat16, accumulates in float32 and returns its bfloat16 result in the model's dtype, and its scales are
bfloat16 (the weights are rounded against those scales, so this adds no weight error). Everything else
of a float32 model (norms, attention, KV cache, residual stream, output layer) stays float32. Elsewhere
the matmul runs in the model's dtype.

Only the attention and feed-forward projections (wq, wk, wv, wo, w1, w2, w3) are quantized; the
token embeddings, the output layer and the norms stay in the model's float dtype (the output layer
is small next to the rest and the logits are most sensitive to it). Each element's error is at
most half its scale.

Under model parallelism every rank quantizes its own slice. Column-parallel slices (wq, wk, wv,
w1, w3) are whole output channels, so their quantization is the same as the unsplit layer's.
Row-parallel slices (wo, w2) split the input features: int8 then takes each channel's scale over
the rank's slice only (results differ slightly from one process), while int4 groups never straddle
a slice boundary (in_features per rank must be a multiple of the group size), so int4 quantizes
identically on any number of ranks.

``save_quantized`` writes a quantized model as a directory that ``Llama.build`` loads without
re-quantizing: params.json, quantization.json and one quantized.NN.pt per model-parallel rank
(plain tensors, loaded with ``weights_only=True``). Such a directory loads only on as many ranks
as it has shards: resharding quantized weights is not supported. Scales are saved in the dtype they
were made in and cast to matmul_dtype on loading: a directory saved on CUDA in float16 and loaded on
CPU has its scales rounded to bfloat16, up to 1/256 of each scale off.
"""

import json
import math
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn
from tqdm import tqdm

from llama.checkpoint import IGNORED_KEYS, CheckpointError, TensorSlice
from llama.parallel import linear_kind

QUANTIZED_LAYERS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 128
QUANTIZATION_FILE = "quantization.json"
FORMAT = "llama-weight-only-quantized"
FORMAT_VERSION = 1
_INT4_INNER_K_TILES = (8, 4, 2)  # CUDA packing: the largest that divides in_features / 16


@dataclass(frozen=True)
class QuantScheme:
    bits: int  # 8 or 4
    group_size: Optional[int] = None  # int4 only: input features per scale/zero group

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"


def parse_quantize(value: Optional[Union[str, QuantScheme]]) -> Optional[QuantScheme]:
    """None (no quantization), "int8", "int4" (group 128) or "int4-gN" with N in 32, 64, 128, 256."""
    if value is None or isinstance(value, QuantScheme):
        return value
    allowed = "None, 'int8', 'int4' (group size 128) or 'int4-g32', 'int4-g64', 'int4-g128', 'int4-g256'"
    if not isinstance(value, str):
        raise ValueError(f"quantize must be {allowed}; got {value!r}")
    if value == "int8":
        return QuantScheme(8)
    if value == "int4":
        return QuantScheme(4, DEFAULT_INT4_GROUP_SIZE)
    match = re.fullmatch(r"int4-g(\d+)", value)
    if match and int(match.group(1)) in INT4_GROUP_SIZES:
        return QuantScheme(4, int(match.group(1)))
    raise ValueError(f"quantize={value!r} is not a known scheme; use {allowed}")


def _has_kernel(op: str, device: torch.device) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)


def _ops(scheme: QuantScheme, device: torch.device) -> Tuple[str, ...]:
    if scheme.bits == 8:
        return ("_weight_int8pack_mm",)
    if device.type == "cpu":
        return ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    return ("_convert_weight_to_int4pack", "_weight_int4pack_mm")


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the quantized matmuls of a model in dtype compute in on device (see the module docstring)."""
    return torch.bfloat16 if device.type == "cpu" else dtype


def check_support(scheme: QuantScheme, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError unless this torch build has the scheme's kernels for device and dtype."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"quantize={scheme.name!r} runs on CPU and CUDA only, not {device.type!r}")
    missing = [op for op in _ops(scheme, device) if not _has_kernel(op, device)]
    if missing:
        raise ValueError(
            f"quantize={scheme.name!r} needs torch.ops.aten.{', '.join(missing)} on {device.type}, which this torch "
            f"{torch.__version__} build lacks; use quantize=None or another scheme"
        )
    if scheme.bits == 4 and device.type == "cuda" and dtype != torch.bfloat16:
        raise ValueError(f"quantize={scheme.name!r} on CUDA needs dtype=bfloat16 (torch's int4 kernel), got {dtype}")


# --- quantizing one weight matrix ------------------------------------------------------------


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scales (out,) in dtype) with weight ~= q * scales[:, None].

    The scales are rounded to dtype first and q is computed with the rounded scales, so the only
    error is q's rounding: at most scale / 2 per element.
    """
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).to(dtype).clamp(min=torch.finfo(dtype).tiny)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weight q stands for, in float64 (a reference for tests)."""
    return q.double() * scales.double()[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int32 (out, in) in [0, 15], scales_and_zeros (in / group_size, out, 2) in dtype).

    For the group g holding input feature k: weight[n, k] ~= (q[n, k] - 8) * sz[g, n, 0] + sz[g, n, 1],
    the layout torch's _weight_int4pack_mm kernels read. Scales span each group's min to max.
    """
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of the int4 group size {group_size}")
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15).to(dtype).clamp(min=torch.finfo(dtype).tiny)
    zeros = (lo + 8 * scales.float()).to(dtype)
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp_(0, 15)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return q.reshape(out_features, in_features).to(torch.int32), scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight q (int values 0..15, (out, in)) stands for, in float64 (a reference for tests)."""
    sz = scales_and_zeros.double().transpose(0, 1).repeat_interleave(group_size, dim=1)  # (out, in, 2)
    return (q.double() - 8) * sz[..., 0] + sz[..., 1]


def _inner_k_tiles(in_features: int) -> int:
    return next(t for t in _INT4_INNER_K_TILES if in_features % (16 * t) == 0)


def _int4_converter(device: torch.device):
    """q int32 (out, in) on device -> the packed weight the device's int4 matmul reads."""
    if device.type == "cpu":
        return lambda q: torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)

    def convert(q: torch.Tensor) -> torch.Tensor:
        # The CUDA converter takes two values a byte, the even input feature in the high nibble.
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(pairs, _inner_k_tiles(q.shape[1]))

    return convert


def _nibbles(t: torch.Tensor) -> torch.Tensor:
    """Every 4-bit nibble of t's memory, in order (low nibble of each byte first), as uint8 values."""
    data = t.contiguous().view(torch.uint8).flatten()
    return torch.stack([data & 15, data >> 4], dim=-1).flatten()


def int4_layout(out_features: int, in_features: int, device: torch.device) -> torch.Tensor:
    """For each nibble of the device-packed int4 weight, the flat index (n * in + k) of the value it holds.

    torch's int4 packing is a fixed rearrangement of the values: it is found by packing the base-16
    digits of every element's own index, so a packed weight can be unpacked (to save it portably)
    whatever the device's tiling.
    """
    count = out_features * in_features
    index = torch.arange(count, device=device)
    source = torch.zeros_like(index)
    convert = _int4_converter(device)
    for digit in range(max(1, math.ceil(math.log(count, 16)))):
        probe = ((index >> (4 * digit)) & 15).to(torch.int32).reshape(out_features, in_features)
        source |= _nibbles(convert(probe)).long() << (4 * digit)
    if not torch.equal(source.sort().values, index):
        raise RuntimeError("torch's int4 packing is not a rearrangement of the values; cannot unpack it")
    return source


# --- the layer ----------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A bias-free linear layer with an int8 or int4 weight, standing in for nn.Linear or for
    fairscale's Column/RowParallelLinear: ``parallel`` "column" and "row" keep those layers' forward
    collectives (copy/gather and reduce of fairscale.nn.model_parallel.mappings) around the
    quantized matmul. The matmul runs in the scales' dtype (``matmul_dtype``); inputs of another
    float dtype are cast to it and the output back to the input's dtype."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, weight: torch.Tensor,
                 scales: torch.Tensor, parallel: str = "none", gather_output: bool = False):
        super().__init__()
        if parallel not in ("none", "column", "row"):
            raise ValueError(f"parallel must be 'none', 'column' or 'row', got {parallel!r}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.parallel, self.gather_output = parallel, gather_output
        # int8: weight (out, in) int8 and scales (out,). int4: weight packed for its device, and
        # scales the (in / group, out, 2) scales and zeros.
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_float(cls, layer: nn.Module, weight: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype) -> "QuantizedLinear":
        """Quantize weight (this rank's (out, in) slice, on its device) for the place of layer (nn.Linear
        or fairscale's) in a model of dtype."""
        parallel, gather = _parallel_kind(layer)
        out_features, in_features = weight.shape
        dtype = matmul_dtype(weight.device, dtype)
        if scheme.bits == 8:
            q, scales = quantize_int8(weight, dtype)
        else:
            q, scales = quantize_int4(weight, scheme.group_size, dtype)
            q = _int4_converter(weight.device)(q)
        return cls(in_features, out_features, scheme, q, scales, parallel, gather)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.name}, parallel={self.parallel}"

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features).to(self.scales.dtype).contiguous()
        if self.scheme.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2d, self.weight, self.scales)
        elif x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.weight, self.scheme.group_size, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2d, self.weight, self.scheme.group_size, self.scales)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel == "none":
            return self._matmul(x)
        from fairscale.nn.model_parallel import mappings

        if self.parallel == "column":
            y = self._matmul(mappings.copy_to_model_parallel_region(x))
            return mappings.gather_from_model_parallel_region(y) if self.gather_output else y
        return mappings.reduce_from_model_parallel_region(self._matmul(x))  # row: input already split

    def portable_state(self, layout: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The weight in a device-independent form: int8 (out, in), or for int4 uint8 (out, in / 2)
        holding input feature 2j in the low nibble and 2j + 1 in the high nibble; plus the scales.
        layout: int4_layout() of this layer's shape, when already at hand."""
        if self.scheme.bits == 8:
            return {"qweight": self.weight, "scales": self.scales}
        return {"qweight": _pairs(self.unpacked_int4(layout)), "scales_and_zeros": self.scales}

    def unpacked_int4(self, layout: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The int4 values as int32 (out, in)."""
        if layout is None:
            layout = int4_layout(self.out_features, self.in_features, self.weight.device)
        q = torch.empty(self.out_features * self.in_features, dtype=torch.uint8, device=self.weight.device)
        q[layout] = _nibbles(self.weight)
        return q.reshape(self.out_features, self.in_features).to(torch.int32)

    @classmethod
    def from_portable(cls, state: Dict[str, torch.Tensor], scheme: QuantScheme, parallel: str, gather_output: bool,
                      device: torch.device, dtype: torch.dtype) -> "QuantizedLinear":
        q = state["qweight"].to(device)
        dtype = matmul_dtype(device, dtype)
        if scheme.bits == 8:
            out_features, in_features = q.shape
            return cls(in_features, out_features, scheme, q, state["scales"].to(device, dtype), parallel, gather_output)
        q = torch.stack([q & 15, q >> 4], dim=-1).flatten(1).to(torch.int32)
        out_features, in_features = q.shape
        sz = state["scales_and_zeros"].to(device, dtype)
        return cls(in_features, out_features, scheme, _int4_converter(device)(q), sz, parallel, gather_output)


def _pairs(q: torch.Tensor) -> torch.Tensor:
    return (q[:, ::2] | q[:, 1::2] << 4).to(torch.uint8)


def _parallel_kind(layer: nn.Module) -> Tuple[str, bool]:
    """(parallel, gather_output) of the QuantizedLinear that stands in for layer (llama.parallel.linear_kind)."""
    if isinstance(layer, QuantizedLinear):
        return layer.parallel, layer.gather_output
    kind = linear_kind(layer)
    if kind is None:
        raise TypeError(f"cannot quantize a {type(layer).__name__}")
    if kind[0] == "row" and not layer.input_is_parallel:
        raise ValueError("quantizing a RowParallelLinear needs input_is_parallel=True")
    return kind


# --- whole models -------------------------------------------------------------------------------


def quantizable(model: nn.Module) -> Dict[str, nn.Module]:
    """The model's layers that quantization replaces, by module name (layers.0.attention.wq, ...)."""
    return {name: m for name, m in model.named_modules() if name.split(".")[-1] in QUANTIZED_LAYERS}


def _local_shape(layer: nn.Module) -> Tuple[int, int]:
    if isinstance(layer, QuantizedLinear):
        return layer.out_features, layer.in_features
    return tuple(layer.weight.shape)


def check_shapes(model: nn.Module, scheme: QuantScheme, device: torch.device) -> None:
    """ValueError, before any weight is read, if a layer's (per-rank) shape does not suit the scheme."""
    if scheme.bits == 8:
        return
    multiple = 16 if device.type == "cpu" else 8
    for name, layer in quantizable(model).items():
        out_features, in_features = _local_shape(layer)
        if in_features % scheme.group_size:
            raise ValueError(
                f"quantize={scheme.name!r}: {name} has in_features={in_features} (on each model-parallel rank), "
                f"not a multiple of the group size {scheme.group_size}; use a smaller group (int4-g32, int4-g64) or int8"
            )
        if out_features % multiple:
            raise ValueError(
                f"quantize={scheme.name!r}: {name} has out_features={out_features} (on each model-parallel rank), "
                f"but torch's int4 kernel on {device.type} needs a multiple of {multiple}; use int8"
            )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, scheme: Union[str, QuantScheme]) -> nn.Module:
    """Quantize an already loaded float model in place (each rank its own slices); returns it."""
    scheme = parse_quantize(scheme)
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    check_support(scheme, device, dtype)
    check_shapes(model, scheme, device)
    for name, layer in quantizable(model).items():
        _replace(model, name, QuantizedLinear.from_float(layer, layer.weight.detach(), scheme, dtype))
    return model


def load_and_quantize(model: nn.Module, plan: Dict[str, TensorSlice], source: Path, device: torch.device,
                      dtype: torch.dtype, scheme: QuantScheme, progress: bool = False) -> int:
    """Like checkpoint.assign_weights, but each planned weight of a quantized layer is quantized as
    soon as it is read (from the checkpoint's own precision), so the float model is never whole in
    memory. model is the float model, typically on the meta device. Returns the bytes read."""
    check_shapes(model, scheme, device)
    expected = model.state_dict()
    plan = {k: v for k, v in plan.items() if k not in IGNORED_KEYS}
    _check_keys_and_shapes(source, expected, {k: s.shape for k, s in plan.items()})
    layers = quantizable(model)
    state, bytes_read = {}, 0
    for key, tensor_slice in tqdm(plan.items(), desc="Loading and quantizing", unit="tensor", disable=not progress or None, leave=False):
        tensor = tensor_slice.load()
        bytes_read += tensor.numel() * tensor.element_size()
        name = key.removesuffix(".weight")
        if name in layers:
            _replace(model, name, QuantizedLinear.from_float(layers[name], tensor.to(device), scheme, dtype))
        else:
            state[key] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=False)
    return bytes_read


def _check_keys_and_shapes(source: Path, expected: Dict[str, torch.Tensor], shapes: Dict[str, Tuple[int, ...]]) -> None:
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{str(source)!r} does not match the model of params.json: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    for key, shape in shapes.items():
        if tuple(shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{str(source)!r}: tensor {key!r} has shape {tuple(shape)} but params.json and the "
                f"model-parallel size give {tuple(expected[key].shape)}"
            )


# --- saving and loading quantized checkpoints ------------------------------------------------------


def _shard_path(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"quantized.{rank:02d}.pt"


def save_quantized(generator_or_model, out_dir: Union[str, Path]) -> Path:
    """Write a quantized model (a Llama or its Transformer) to out_dir for Llama.build to load as is.

    Under model parallelism every rank must call this: each writes its own quantized.NN.pt and
    rank 0 the params.json and quantization.json. The files hold plain tensors only (int4 weights
    two values a byte, independent of the device's packing), loadable with weights_only=True.
    """
    from llama.distributed import global_rank, model_parallel_rank, model_parallel_world_size

    model = getattr(generator_or_model, "model", generator_or_model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    schemes = {m.scheme for m in layers.values()}
    if len(schemes) != 1:
        raise ValueError("save_quantized needs a model built with Llama.build(..., quantize=...)")
    (scheme,) = schemes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world, rank = model_parallel_world_size(), model_parallel_rank()
    state, layouts = {}, {}
    for key, tensor in model.state_dict().items():
        name = key.rpartition(".")[0]
        if name not in layers:
            state[key] = tensor.detach().cpu().contiguous()
    for name, layer in layers.items():
        layout = None
        if scheme.bits == 4:  # one unpacking layout per shape
            shape = (layer.out_features, layer.in_features)
            if shape not in layouts:
                layouts[shape] = int4_layout(*shape, layer.weight.device)
            layout = layouts[shape]
        for k, v in layer.portable_state(layout).items():
            state[f"{name}.{k}"] = v.detach().cpu().contiguous()
    if global_rank() < world:  # ranks beyond the first model-parallel group hold copies
        torch.save(state, _shard_path(out_dir, rank))
    if global_rank() == 0:
        args = model.params
        params = {k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                                                "ffn_dim_multiplier", "norm_eps", "rope_theta")}
        (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        info = {"format": FORMAT, "version": FORMAT_VERSION, "quantize": scheme.name, **asdict(scheme),
                "shards": world, "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
                "quantized_layers": list(QUANTIZED_LAYERS)}
        (out_dir / QUANTIZATION_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out_dir


def stored_quantization(ckpt_dir: Union[str, Path]) -> Optional[dict]:
    """quantization.json of a directory save_quantized wrote, checked; None if it has none."""
    path = Path(ckpt_dir) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        if info.get("format") != FORMAT or info.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{str(path)!r} is not a version {FORMAT_VERSION} {FORMAT} description")
        info["scheme"] = parse_quantize(info["quantize"])
        if not isinstance(info["shards"], int) or info["shards"] < 1:
            raise CheckpointError(f"{str(path)!r}: shards={info['shards']!r} must be a positive integer")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{str(path)!r} is not a valid quantization description: {e!r}") from e
    return info


def check_stored_request(stored: dict, requested: Optional[QuantScheme], world: int, ckpt_dir: Path) -> None:
    """ValueError if a quantized directory cannot serve this build request."""
    if requested is not None and requested != stored["scheme"]:
        raise ValueError(
            f"{str(ckpt_dir)!r} holds weights quantized as {stored['quantize']!r}, not the requested "
            f"quantize={requested.name!r}; pass quantize={stored['quantize']!r} (or None), or quantize the float checkpoint"
        )
    if world != stored["shards"]:
        raise ValueError(
            f"{str(ckpt_dir)!r} was quantized for {stored['shards']} model-parallel rank(s) but this run has {world}; "
            f"resharding quantized weights is not supported: run {stored['shards']} process(es), or quantize the float checkpoint"
        )


def load_quantized(model: nn.Module, ckpt_dir: Path, stored: dict, rank: int, device: torch.device, dtype: torch.dtype) -> int:
    """Load this rank's quantized.NN.pt into the float model (meta device is fine), replacing its
    quantizable layers. Float tensors are cast to dtype, scales to matmul_dtype(device, dtype). Returns the bytes read."""
    scheme = stored["scheme"]
    check_support(scheme, device, dtype)
    path = _shard_path(ckpt_dir, rank)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{str(path)!r} is missing from the quantized checkpoint") from e
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable quantized shard (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} must hold a dict of tensors")
    layers = quantizable(model)
    expected = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers}
    shapes = {}
    for name, layer in layers.items():
        out_features, in_features = _local_shape(layer)
        if scheme.bits == 8:
            shapes.update({f"{name}.qweight": (out_features, in_features), f"{name}.scales": (out_features,)})
        else:
            shapes.update({f"{name}.qweight": (out_features, in_features // 2),
                           f"{name}.scales_and_zeros": (in_features // scheme.group_size, out_features, 2)})
    _check_keys_and_shapes(path, {**expected, **{k: torch.empty(s, device="meta") for k, s in shapes.items()}},
                           {k: v.shape for k, v in state.items()})
    for name, layer in layers.items():
        parallel, gather = _parallel_kind(layer)
        part = {k.rpartition(".")[2]: state[k] for k in shapes if k.rpartition(".")[0] == name}
        _replace(model, name, QuantizedLinear.from_portable(part, scheme, parallel, gather, device, dtype))
    model.load_state_dict({k: state[k].to(device=device, dtype=dtype) for k in expected}, assign=True, strict=False)
    return sum(t.numel() * t.element_size() for t in state.values())

