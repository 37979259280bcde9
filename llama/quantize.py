"""Quantization of the transformer's linear layers, run by PyTorch's own kernels (and on AVX2 CPUs by llama's).

Schemes (the ``quantize`` argument of ``Llama.build``):

- ``"int8"``: weight-only, one symmetric scale per output channel; q = round(w / s) in [-127, 127] with
  s = max|w_row| / 127, and w ~= q * s. Matmul: ``torch.ops.aten._weight_int8pack_mm``, or on CPUs whose
  best torch code is AVX2, llama's own ``llama_cpu::int8_matmul`` (llama/native.py; float32 inputs kept as they are).
- ``"w8a8"`` (CPU only): the same int8 weights, and each row of a layer's input (each token) quantized
  to int8 as it arrives, with its own scale max|x_row| / 127; the integer products are summed exactly
  (``torch._int_mm``, oneDNN's int8 kernels; on AVX2 CPUs llama's own ``llama_cpu::int8_int8_matmul``, the
  same sums) and scaled in float32 (see
  ``quantized_linear.int8_dynamic_matmul``). This is what llama.cpp's q8_0 does on CPU (there with a
  scale per 32 values): on CPUs with VNNI or AMX it decodes and reads prompts faster than int8, at the
  cost of the activations' rounding. torch's int8 matmul on CUDA needs more than 16 rows, so a decode
  step could not use it there.
- ``"int4"`` (= ``"int4-g128"``), ``"int4-g32"``, ``"int4-g64"``, ``"int4-g256"``: groups of that many
  consecutive input features per output channel, each with its own scale and zero (asymmetric,
  min/max): q in [0, 15] with w ~= (q - 8) * scale + zero, the layout of torch's int4 kernels.
  Matmul: ``_weight_int4pack_mm_for_cpu`` on CPU, ``_weight_int4pack_mm`` on CUDA (bfloat16 only).

On CPU the weight-only matmuls (except int8's on AVX2 CPUs, above) compute in bfloat16 whatever the model's
dtype: torch's CPU int8 and int4 kernels are vectorized only for bfloat16 inputs (their float32 and float16 paths run scalar code, 15 to
130 times slower, slower than not quantizing at all). So on CPU such a layer rounds its input to
bfloat16, accumulates in float32 and returns its bfloat16 result in the model's dtype, and its scales are
bfloat16 (the weights are rounded against those scales, so this adds no weight error). Everything else
of a float32 model (norms, attention, KV cache, residual stream) stays float32. Elsewhere the matmul runs
in the model's dtype. w8a8's scales are float32 on every model dtype.

The attention and feed-forward projections (wq, wk, wv, wo, w1, w2, w3) are quantized with the
scheme, and the output layer with int8 under int4 (w8a8 under w8a8), as llama.cpp's q8_0 and q4_0
files keep it at 8 and 6 bits, and as gpt-fast's int8 does: it is 98 MB of a 134M model's float32 step and
50 of its int8 step, while int4 would cost the logits more accuracy. The token embeddings (a step
reads one row) and the norms stay in the model's float dtype. Each element's error is at most half
its scale.

Under model parallelism every rank quantizes its own slice. Column-parallel slices (wq, wk, wv,
w1, w3) are whole output channels, so their quantization is the same as the unsplit layer's.
Row-parallel slices (wo, w2) split the input features: int8 then takes each channel's scale over
the rank's slice only, and w8a8 each token's scale too (results differ slightly from one process),
while int4 groups never straddle a slice boundary (in_features per rank must be a multiple of the
group size), so int4 quantizes identically on any number of ranks.

``save_quantized`` writes a quantized model as a directory that ``Llama.build`` loads without
re-quantizing: params.json, quantization.json and one quantized.NN.pt per model-parallel rank
(plain tensors, loaded with ``weights_only=True``). Such a directory loads only on as many ranks
as it has shards: resharding quantized weights is not supported. Scales are saved in the dtype they
were made in and cast to matmul_dtype on loading: a directory saved on CUDA in float16 and loaded on
CPU has its scales rounded to bfloat16, up to 1/256 of each scale off.
"""

import json
import pickle
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from llama import native
from llama.checkpoint import CheckpointError, LoadHook, StateDictReader, TensorSlice, require_regular_file, whole_plan
from llama.quantized_linear import (  # noqa: F401 (the layer and its weight math, public here too)
    QuantizedLinear,
    QuantScheme,
    dequantize_int4,
    dequantize_int8,
    int4_layout,
    matmul_dtype,
    parallel_kind,
    quantize_int4,
    quantize_int8,
)

QUANTIZED_LAYERS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # quantized with the scheme asked for
OUTPUT_LAYER, OUTPUT_SCHEME = "output", QuantScheme(8)  # the output layer under int4 (layer_scheme)
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 128
QUANTIZATION_FILE = "quantization.json"
FORMAT = "llama-weight-only-quantized"
FORMAT_VERSION = 2  # 1: the output layer float; 2: quantized too (quantization.json's "output_quantize")


def parse_quantize(value: Optional[Union[str, QuantScheme]]) -> Optional[QuantScheme]:
    """None (no quantization), "int8", "w8a8", "int4" (group 128) or "int4-gN" with N in 32, 64, 128, 256."""
    if value is None or isinstance(value, QuantScheme):
        return value
    allowed = "None, 'int8', 'w8a8', 'int4' (group size 128) or 'int4-g32', 'int4-g64', 'int4-g128', 'int4-g256'"
    if not isinstance(value, str):
        raise ValueError(f"quantize must be {allowed}; got {value!r}")
    if value == "int8":
        return QuantScheme(8)
    if value == "w8a8":
        return QuantScheme(8, activations=8)
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
    if scheme.activations:
        return ("_int_mm",)
    if scheme.bits == 8:
        return ("_weight_int8pack_mm",)
    if device.type == "cpu":
        return ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    return ("_convert_weight_to_int4pack", "_weight_int4pack_mm")


def check_support(scheme: QuantScheme, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError unless this torch build has the scheme's kernels (and the output layer's int8 one)
    for device and dtype."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"quantize={scheme.name!r} runs on CPU and CUDA only, not {device.type!r}")
    if scheme.activations and device.type != "cpu":
        raise ValueError(f"quantize={scheme.name!r} runs on CPU only (torch's int8 matmul on {device.type} needs more "
                         f"than 16 rows, and a decode step has fewer); use quantize='int8' there")
    ops = dict.fromkeys(_ops(scheme, device) + _ops(layer_scheme(OUTPUT_LAYER, scheme), device))
    missing = [op for op in ops if not _has_kernel(op, device)]
    if missing:
        raise ValueError(
            f"quantize={scheme.name!r} needs torch.ops.aten.{', '.join(missing)} on {device.type}, which this torch "
            f"{torch.__version__} build lacks; use quantize=None or another scheme"
        )
    if scheme.bits == 4 and device.type == "cuda" and dtype != torch.bfloat16:
        raise ValueError(f"quantize={scheme.name!r} on CUDA needs dtype=bfloat16 (torch's int4 kernel), got {dtype}")
    if scheme.activations and not fast_int8_matmul() and not native.ready():
        # Right, only slow: a warning, not an error (once per process, from this line).
        warnings.warn(
            f"quantize={scheme.name!r} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no AVX-512 VNNI or AMX): "
            f"torch's int8 matmul (torch._int_mm) runs here without oneDNN's int8 kernels, and llama's own kernels "
            f"are off or did not build ({native.VARIABLE}), several times slower than not quantizing at all (README: "
            f"'Compiled decoding and quantized weights'); quantize='int8' is the fast choice on this CPU",
            stacklevel=1)


def fast_int8_matmul() -> bool:
    """Whether torch._int_mm, w8a8's matmul, has fast kernels on this CPU: oneDNN's, with AVX-512 VNNI or AMX
    instructions. Without them (AVX2-only CPUs, for one) torch runs it as a plain loop."""
    return torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()


# --- whole models -------------------------------------------------------------------------------


def quantizable(model: nn.Module, output: bool = True) -> Dict[str, nn.Module]:
    """The model's layers that quantization replaces, by module name (layers.0.attention.wq, ..., output);
    output=False leaves the output layer out (a version 1 quantized directory keeps it float)."""
    return {name: m for name, m in model.named_modules()
            if name.split(".")[-1] in QUANTIZED_LAYERS or (output and name == OUTPUT_LAYER)}


def layer_scheme(name: str, scheme: QuantScheme) -> QuantScheme:
    """The scheme the layer called name is quantized with when the model's is scheme: the output layer is 8-bit
    under every scheme (OUTPUT_SCHEME under int4)."""
    return OUTPUT_SCHEME if name == OUTPUT_LAYER and scheme.bits != 8 else scheme


def _local_shape(layer: nn.Module) -> Tuple[int, int]:
    if isinstance(layer, QuantizedLinear):
        return layer.out_features, layer.in_features
    return tuple(layer.weight.shape)


def check_shapes(model: nn.Module, scheme: QuantScheme, device: torch.device) -> None:
    """ValueError, before any weight is read, if a layer's (per-rank) shape does not suit the scheme."""
    if scheme.bits == 8:
        return
    multiple = 16 if device.type == "cpu" else 8
    for name, layer in quantizable(model, output=False).items():
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
        _replace(model, name, QuantizedLinear.from_float(layer, layer.weight.detach(), layer_scheme(name, scheme), dtype))
    return model


class QuantizeOnLoad(LoadHook):
    """checkpoint.load_weights' hook that quantizes each weight of a quantizable layer as soon as it is
    read (from the checkpoint's own precision), so the float model is never whole in memory. model is
    the float model, typically on the meta device."""

    description = "Loading and quantizing"

    def __init__(self, model: nn.Module, scheme: QuantScheme, device: torch.device, dtype: torch.dtype):
        check_shapes(model, scheme, device)
        self.layers, self.scheme, self.device, self.dtype = quantizable(model), scheme, device, dtype

    def take(self, model: nn.Module, key: str, tensor: torch.Tensor) -> bool:
        name = key.removesuffix(".weight")
        if name not in self.layers:
            return False
        layer = QuantizedLinear.from_float(self.layers[name], tensor.to(self.device), layer_scheme(name, self.scheme), self.dtype)
        _replace(model, name, layer)
        return True


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
    schemes = {m.scheme for name, m in layers.items() if name != OUTPUT_LAYER}
    if len(schemes) != 1:
        raise ValueError("save_quantized needs a model built with Llama.build(..., quantize=...)")
    (scheme,) = schemes
    output = layers.get(OUTPUT_LAYER)
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
        if layer.scheme.bits == 4:  # one unpacking layout per shape
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
                "quantized_layers": list(QUANTIZED_LAYERS) + ([OUTPUT_LAYER] if output is not None else []),
                "output_quantize": output.scheme.name if output is not None else None}
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
        if info.get("format") != FORMAT or info.get("version") not in (1, FORMAT_VERSION):
            raise CheckpointError(f"{str(path)!r} is not a version 1 or {FORMAT_VERSION} {FORMAT} description "
                                  f"(a newer version is written by a newer llama: upgrade it)")
        info["scheme"] = parse_quantize(info["quantize"])
        output = info.get("output_quantize") if info["version"] >= 2 else None
        expected = layer_scheme(OUTPUT_LAYER, info["scheme"]).name
        if output not in (None, expected):
            raise CheckpointError(f"{str(path)!r}: output_quantize={output!r} must be {expected!r} or null")
        info["output_quantized"] = output is not None
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


def stored_plan(model: nn.Module, ckpt_dir: Path, stored: dict, rank: int, device: torch.device,
                dtype: torch.dtype) -> Tuple[Path, Dict[str, TensorSlice], LoadHook]:
    """This rank's quantized.NN.pt (memory-mapped), its tensors as a plan, and the hook with which
    checkpoint.load_weights puts them into the float model (meta device is fine)."""
    check_support(stored["scheme"], device, dtype)
    path = _shard_path(ckpt_dir, rank)
    require_regular_file(path)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{str(path)!r} is missing from the quantized checkpoint") from e
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable quantized shard (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} must hold a dict of tensors")
    return path, whole_plan(StateDictReader(state)), _LoadStored(model, stored["scheme"], stored["output_quantized"], device, dtype)


class _LoadStored(LoadHook):
    """Builds each QuantizedLinear from its stored parts (qweight and its scales) once both are read.
    Float tensors (the output layer's too when output_quantized is False) are left to load_weights (cast
    to dtype), scales are cast to matmul_dtype(device, dtype, scheme)."""

    description = "Loading quantized weights"

    def __init__(self, model: nn.Module, scheme: QuantScheme, output_quantized: bool, device: torch.device, dtype: torch.dtype):
        self.layers, self.scheme, self.device, self.dtype = quantizable(model, output_quantized), scheme, device, dtype
        self.parts: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in self.layers}

    def expected_shapes(self, model: nn.Module) -> Dict[str, Tuple[int, ...]]:
        shapes = {k: v for k, v in super().expected_shapes(model).items() if k.rpartition(".")[0] not in self.layers}
        for name, layer in self.layers.items():
            out_features, in_features = _local_shape(layer)
            if layer_scheme(name, self.scheme).bits == 8:
                shapes.update({f"{name}.qweight": (out_features, in_features), f"{name}.scales": (out_features,)})
            else:
                shapes.update({f"{name}.qweight": (out_features, in_features // 2),
                               f"{name}.scales_and_zeros": (in_features // self.scheme.group_size, out_features, 2)})
        return shapes

    def take(self, model: nn.Module, key: str, tensor: torch.Tensor) -> bool:
        name, _, part = key.rpartition(".")
        if name not in self.layers:
            return False
        parts = self.parts[name]
        parts[part] = tensor
        if len(parts) == 2:  # the weight and its scales
            parallel, gather = parallel_kind(self.layers[name])
            scheme = layer_scheme(name, self.scheme)
            _replace(model, name, QuantizedLinear.from_portable(parts, scheme, parallel, gather, self.device, self.dtype))
        return True
