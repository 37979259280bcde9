"""llama's native CPU matmuls (llama/native.py): their products against float64, their refusals, when they are
used, their build (kept once, never half-written, a failure falling back to torch's kernels)."""

import os
import warnings

import pytest

import torch
from torch import nn

from llama import native
from llama.model import Linear
from llama.quantize import QuantizedLinear, dequantize_int8, parse_quantize


@pytest.fixture
def kernel(monkeypatch):
    """The kernel on any CPU that can run it (LLAMA_NATIVE_KERNELS=on), built or loaded."""
    monkeypatch.setenv(native.VARIABLE, "on")
    if not native.wanted():
        pytest.skip(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no AVX2")
    assert native.ready(), "the native kernel did not build on an AVX2 CPU (see the warning)"
    return torch.ops.llama_cpu.int8_matmul


def _operands(rows: int, in_features: int, out_features: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=g)
    scales = (torch.rand(out_features, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    return x, q, scales


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 20])
@pytest.mark.parametrize("in_features", [32, 45, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_is_the_float64_product_to_float32_rounding(kernel, rows, in_features, dtype):
    """Every row count (blocks of eight and the rest), in_features with a tail past the last 32, both input dtypes:
    y = x @ (q * scales).T summed in float32, so within a few float32 roundings of sum |x| |w| of the exact product
    (a bfloat16 input is widened, not rounded; the output is rounded to the input's dtype)."""
    x, q, scales = _operands(rows, in_features, 67, dtype)
    y = kernel(x, q, scales)
    assert y.shape == (rows, 67) and y.dtype == dtype
    weight = dequantize_int8(q, scales)
    exact = x.double() @ weight.T
    scale_of_terms = x.double().abs() @ weight.abs().T
    output_rounding = exact.abs() * (2 ** -8 if dtype == torch.bfloat16 else 0)
    assert ((y.double() - exact).abs() <= 2 ** -20 * scale_of_terms + output_rounding).all()


@pytest.mark.parametrize("rows", [1, 3, 8, 11])
@pytest.mark.parametrize("in_features", [40, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_matmul_is_the_float64_product_to_float32_rounding(kernel, rows, in_features, dtype):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    weight = torch.randn(37, in_features, generator=g).to(torch.bfloat16)
    y = torch.ops.llama_cpu.bf16_matmul(x, weight)
    assert y.shape == (rows, 37) and y.dtype == dtype
    exact = x.double() @ weight.double().T
    output_rounding = exact.abs() * (2 ** -8 if dtype == torch.bfloat16 else 0)
    assert ((y.double() - exact).abs() <= 2 ** -20 * (x.double().abs() @ weight.double().abs().T) + output_rounding).all()


def _ops_run(f) -> set:
    with torch.profiler.profile() as profile:
        f()
    return {event.name for event in profile.events()}


def test_bfloat16_linear_layers_use_the_kernel_where_it_is_wanted(kernel, monkeypatch):
    layer = Linear(96, 24, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 5, 96).to(torch.bfloat16)
    with torch.no_grad():
        assert "llama_cpu::bf16_matmul" in _ops_run(lambda: layer(x))
        assert "llama_cpu::bf16_matmul" not in _ops_run(lambda: layer.float()(x.float()))  # float32: torch's
        layer.bfloat16()
        fast = layer(x)
        monkeypatch.setenv(native.VARIABLE, "off")
        assert "llama_cpu::bf16_matmul" not in _ops_run(lambda: layer(x))
        # Both sum in float32 and round once: the same numbers here.
        torch.testing.assert_close(fast, layer(x), rtol=0, atol=0)


def test_int8_matmul_keeps_leading_dimensions(kernel):
    x, q, scales = _operands(6, 64, 10, torch.float32)
    torch.testing.assert_close(kernel(x.view(2, 3, 64), q, scales), kernel(x, q, scales).view(2, 3, 10), rtol=0, atol=0)


def test_int8_matmul_refuses_what_it_cannot_multiply(kernel):
    x, q, scales = _operands(2, 64, 10, torch.float32)
    for args, words in (
        ((x.half(), q, scales), "x must be float32 or bfloat16"),
        ((x[:, :60], q, scales), "x has 60 features, the weight takes 64"),
        ((x, q.to(torch.int16), scales), "weight must be a contiguous int8 matrix"),
        ((x, q.t(), scales), "weight must be a contiguous int8 matrix"),
        ((x, q, scales.float()), "scales must be a contiguous bfloat16 vector"),
        ((x, q, scales[:5]), "scales must be a contiguous bfloat16 vector"),
    ):
        with pytest.raises(RuntimeError, match=words):
            kernel(*args)
    with pytest.raises(RuntimeError, match="weight must be a contiguous bfloat16 matrix"):
        torch.ops.llama_cpu.bf16_matmul(x, q)
    with pytest.raises(RuntimeError, match="x has 64 features, the weight takes 32"):
        torch.ops.llama_cpu.bf16_matmul(x, torch.zeros(3, 32, dtype=torch.bfloat16))


def test_int8_layers_use_the_kernel_where_it_is_wanted(kernel, monkeypatch):
    """A layer decides when it is made. With the kernel, a float32 input is not rounded to bfloat16: the layer is
    the float64 product of its own dequantized weight to float32 rounding, where torch's kernel is off by bfloat16's."""
    layer = nn.Linear(256, 48, bias=False)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    fast = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize("int8"), torch.float32)
    monkeypatch.setenv(native.VARIABLE, "off")
    plain = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize("int8"), torch.float32)
    assert fast.native_int8 and not plain.native_int8
    assert torch.equal(fast.weight, plain.weight) and torch.equal(fast.scales, plain.scales)
    exact = x.double() @ dequantize_int8(fast.weight, fast.scales).T
    fast_error, plain_error = ((f(x).double() - exact).abs().max().item() for f in (fast, plain))
    assert fast_error < 1e-5 < plain_error
    monkeypatch.setenv(native.VARIABLE, "on")
    assert not QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize("int4"), torch.float32).native_int8


def test_w8a8_layers_take_the_same_integer_sums_from_the_kernel(kernel, monkeypatch):
    """llama_cpu::int8_int8_matmul is torch._int_mm exactly (every row count, a tail past the last 32, activations
    at -128), so a w8a8 layer on it returns the very numbers it returns on torch's kernel."""
    g = torch.Generator().manual_seed(4)
    for rows, in_features in ((1, 768), (3, 45), (8, 64), (13, 2048), (20, 32)):
        xq = torch.randint(-128, 128, (rows, in_features), dtype=torch.int8, generator=g)
        q = torch.randint(-127, 128, (50, in_features), dtype=torch.int8, generator=g)
        products = torch.ops.llama_cpu.int8_int8_matmul(xq, q)
        assert products.dtype == torch.int32 and torch.equal(products.long(), xq.long() @ q.long().T)
    with pytest.raises(RuntimeError, match="xq has 45 features, q takes 32"):
        torch.ops.llama_cpu.int8_int8_matmul(xq[:, :45] if xq.shape[1] > 45 else torch.zeros(2, 45, dtype=torch.int8), q)
    with pytest.raises(RuntimeError, match="xq must be an int8 matrix"):
        torch.ops.llama_cpu.int8_int8_matmul(xq.float(), q)
    layer = nn.Linear(256, 48, bias=False)
    x = torch.randn(5, 256, generator=g)
    fast = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize("w8a8"), torch.float32)
    monkeypatch.setenv(native.VARIABLE, "off")
    plain = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize("w8a8"), torch.float32)
    assert fast.native_int8 and not plain.native_int8
    with torch.no_grad():
        assert "llama_cpu::int8_int8_matmul" in _ops_run(lambda: fast(x))
        assert torch.equal(fast(x), plain(x))


def test_the_setting_and_the_cpu_decide(monkeypatch):
    for capability, auto, on in (("AVX2", True, True), ("AVX512", False, True), ("DEFAULT", False, False)):
        monkeypatch.setattr(native, "_cpu_capability", lambda: capability)
        monkeypatch.delenv(native.VARIABLE, raising=False)
        assert native.wanted() is auto
        monkeypatch.setenv(native.VARIABLE, "auto")
        assert native.wanted() is auto
        monkeypatch.setenv(native.VARIABLE, "on")
        assert native.wanted() is on
        monkeypatch.setenv(native.VARIABLE, "off")
        assert native.wanted() is False and native.ready() is False
    monkeypatch.setenv(native.VARIABLE, "fast")
    with pytest.raises(ValueError, match="LLAMA_NATIVE_KERNELS='fast' is not a setting: use 'auto'"):
        native.wanted()


def test_the_build_is_kept_and_never_left_half_written(kernel, monkeypatch, tmp_path):
    built = native.build(tmp_path)
    assert built.parent == tmp_path and os.listdir(tmp_path) == [built.name]
    stamp = built.stat().st_mtime_ns
    assert native.build(tmp_path) == built and built.stat().st_mtime_ns == stamp  # found, not built again
    broken = tmp_path / "broken"
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails at once
    with pytest.raises(Exception):
        native.build(broken)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        native.build(broken)
    assert not broken.exists() or not any(broken.iterdir())


def test_a_failed_build_warns_and_leaves_torchs_kernel(monkeypatch):
    monkeypatch.setenv(native.VARIABLE, "on")
    monkeypatch.setattr(native, "_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(native, "_registered", lambda: False)
    monkeypatch.setattr(native, "_loaded", None)

    def fail(directory=None):
        raise RuntimeError("g++ failed: no space left on device")

    monkeypatch.setattr(native, "build", fail)
    with pytest.warns(RuntimeWarning, match="building llama's native CPU kernels failed .*no space left.*torch's"):
        assert native.ready() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert native.ready() is False
    layer = nn.Linear(64, 8, bias=False)
    quantized = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize("int8"), torch.float32)
    assert not quantized.native_int8 and quantized(torch.randn(2, 64)).shape == (2, 8)
