"""QuantizedLinear: a bias-free linear layer with an int8 or int4 weight, run by torch's own kernels (int8 and w8a8
on AVX2 CPUs by llama's, llama/native.py),
and the math behind it (quantizing one matrix or a batch of activations, torch's int4 packing and its inverse).
See llama/quantize.py for the schemes and for quantizing whole models."""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llama import native
from llama.parallel import linear_kind

_INT4_INNER_K_TILES = (8, 4, 2)  # CUDA packing: the largest that divides in_features / 16


@dataclass(frozen=True)
class QuantScheme:
    bits: int  # 8 or 4
    group_size: Optional[int] = None  # int4 only: input features per scale/zero group
    activations: Optional[int] = None  # 8: each row of the input is quantized to int8 too (w8a8)

    @property
    def name(self) -> str:
        if self.activations:
            return "w8a8"
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"


def matmul_dtype(device: torch.device, dtype: torch.dtype, scheme: Optional[QuantScheme] = None) -> torch.dtype:
    """The dtype the quantized matmuls of a model in dtype compute in on device, that of their scales: float32
    for w8a8 (integer products, scaled in float32), else bfloat16 on CPU (see llama/quantize.py) or dtype."""
    if scheme is not None and scheme.activations:
        return torch.float32
    return torch.bfloat16 if device.type == "cpu" else dtype


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


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (rows, in), scales (rows, 1) float32) with x ~= q * scales: one symmetric scale per row of x
    (per token), s = max|x_row| / 127, so each element is off by at most s / 2."""
    x = x.float()
    scales = (x.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(x / scales).clamp_(-127, 127).to(torch.int8), scales


def int8_dynamic_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, native_kernel: bool = False) -> torch.Tensor:
    """x (rows, in) times the int8 weight q (out, in) with per-channel scales (out,), both operands in int8:
    x is quantized per row (quantize_rows), torch._int_mm sums the integer products exactly in int32, and
    the result is scaled by both scales in float32. On CPU, torch runs _int_mm with oneDNN's int8 kernels
    (VNNI/AMX where the CPU has them), and inductor's freezing passes turn this very pattern into its
    prepacked int8 GEMM, which is why it is written as it is. native_kernel: the same sums by llama's own
    kernel (llama/native.py), for CPUs without VNNI, where _int_mm is a plain loop."""
    xq, x_scales = quantize_rows(x)
    products = torch.ops.llama_cpu.int8_int8_matmul(xq, q) if native_kernel else torch._int_mm(xq, q.t())
    return products.float() * x_scales * scales


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
    float dtype are cast to it and the output back to the input's dtype. Under w8a8 the weight is int8
    as under int8 (scales float32), and each input row is quantized to int8 on the fly."""

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
        # int8 or w8a8 on a CPU where llama's own kernels beat torch's (llama/native.py): decided when the layer is made.
        self.native_int8 = scheme.bits == 8 and weight.device.type == "cpu" and native.ready() \
            and (scheme.activations is not None or scales.dtype == torch.bfloat16)

    @classmethod
    def from_float(cls, layer: nn.Module, weight: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype) -> "QuantizedLinear":
        """Quantize weight (this rank's (out, in) slice, on its device) for the place of layer (nn.Linear
        or fairscale's) in a model of dtype."""
        parallel, gather = parallel_kind(layer)
        out_features, in_features = weight.shape
        dtype = matmul_dtype(weight.device, dtype, scheme)
        if scheme.bits == 8:
            q, scales = quantize_int8(weight, dtype)
        else:
            q, scales = quantize_int4(weight, scheme.group_size, dtype)
            q = _int4_converter(weight.device)(q)
        return cls(in_features, out_features, scheme, q, scales, parallel, gather)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.name}, parallel={self.parallel}"

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        native_kernel = self.native_int8 and x.device.type == "cpu"
        if native_kernel and not self.scheme.activations:  # float32 inputs as they are
            x2d = x.reshape(-1, self.in_features)
            y = torch.ops.llama_cpu.int8_matmul(x2d if x.dtype == torch.bfloat16 else x2d.float(), self.weight, self.scales)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        x2d = x.reshape(-1, self.in_features).to(self.scales.dtype).contiguous()
        if self.scheme.activations:
            y = int8_dynamic_matmul(x2d, self.weight, self.scales, native_kernel=native_kernel)
        elif self.scheme.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(*self._int8_operands(x2d), self.scales)
        elif x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.weight, self.scheme.group_size, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2d, self.weight, self.scheme.group_size, self.scales)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _int8_operands(self, x2d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Input and weight for torch's int8 kernel, which reads in_features 16 at a time (and crashes or returns
        NaN otherwise): zero columns pad both to a multiple of 16, which adds nothing to the products."""
        pad = -self.in_features % 16
        if not pad:
            return x2d, self.weight
        padded = getattr(self, "_padded_weight", None)
        if padded is None or padded.device != self.weight.device:
            padded = self._padded_weight = F.pad(self.weight, (0, pad))
        return F.pad(x2d, (0, pad)), padded

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
        dtype = matmul_dtype(device, dtype, scheme)
        if scheme.bits == 8:
            out_features, in_features = q.shape
            return cls(in_features, out_features, scheme, q, state["scales"].to(device, dtype), parallel, gather_output)
        q = torch.stack([q & 15, q >> 4], dim=-1).flatten(1).to(torch.int32)
        out_features, in_features = q.shape
        sz = state["scales_and_zeros"].to(device, dtype)
        return cls(in_features, out_features, scheme, _int4_converter(device)(q), sz, parallel, gather_output)


def _pairs(q: torch.Tensor) -> torch.Tensor:
    return (q[:, ::2] | q[:, 1::2] << 4).to(torch.uint8)


def native_int8_layers(model: nn.Module) -> bool:
    """Whether any of model's int8 or w8a8 layers multiplies by llama's own kernels (llama/native.py)."""
    return any(isinstance(m, QuantizedLinear) and m.native_int8 for m in model.modules())


def parallel_kind(layer: nn.Module) -> Tuple[str, bool]:
    """(parallel, gather_output) of the QuantizedLinear that stands in for layer (llama.parallel.linear_kind)."""
    if isinstance(layer, QuantizedLinear):
        return layer.parallel, layer.gather_output
    kind = linear_kind(layer)
    if kind is None:
        raise TypeError(f"cannot quantize a {type(layer).__name__}")
    if kind[0] == "row" and not layer.input_is_parallel:
        raise ValueError("quantizing a RowParallelLinear needs input_is_parallel=True")
    return kind
