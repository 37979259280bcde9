"""int8/int4 weight quantization and w8a8 (llama/quantize.py) on the CPU, with torch's own kernels."""

import json
import shutil

import pytest
import torch
from torch import nn

from llama import Llama
from llama.checkpoint import CheckpointError
from llama.convert import reshard
from llama.quantize import (
    QuantizedLinear,
    QuantScheme,
    check_support,
    dequantize_int4,
    dequantize_int8,
    int4_layout,
    layer_scheme,
    matmul_dtype,
    parse_quantize,
    quantize_int4,
    save_quantized,
)
from llama.quantized_linear import int8_dynamic_matmul, quantize_rows

TOKENS = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(0))


def build(ckpt_dir, tokenizer, **kwargs):
    return Llama.build(str(ckpt_dir), str(tokenizer), max_seq_len=32, max_batch_size=2, device="cpu", **kwargs)


def float_layer(out_features=48, in_features=256, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.1, 3.0, out_features)[:, None])  # channels of different ranges
    return layer


# On CPU a quantized layer computes in bfloat16 (llama.quantize.matmul_dtype): its input and its output
# are rounded to bfloat16, each by at most BF16_ROUNDING of its magnitude; the sums run in float32.
BF16_ROUNDING = 2.0 ** -8


def bfloat16_matmul_bound(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """How far y, the bfloat16 result of x @ weight.T, can be from the exact product in float64:
    the input's rounding (|x| @ |weight|.T) and the output's (|y|), each relative to BF16_ROUNDING."""
    return BF16_ROUNDING * (x.double().abs() @ weight.double().abs().T + y.double().abs()) + 1e-5


@pytest.mark.parametrize("shape", [(5, 256), (2, 3, 256)], ids=["2d", "3d"])
def test_int8_layer_matches_float_within_half_a_step(shape):
    layer = float_layer()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    quantized = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize("int8"), torch.float32)
    assert quantized.weight.dtype == torch.int8 and quantized.scales.shape == (48,)
    assert quantized.scales.dtype == matmul_dtype(torch.device("cpu"), torch.float32) == torch.bfloat16
    y = quantized(x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
    # The kernel computes x @ (q * scales).T: against a float64 dequantize-then-matmul reference.
    dequantized = dequantize_int8(quantized.weight, quantized.scales)
    reference = x.double() @ dequantized.T
    assert ((y.double() - reference).abs() <= bfloat16_matmul_bound(x, dequantized, y)).all()
    # Each weight is off by at most half its channel's step, so each output by scale / 2 * sum|x|.
    weight_error = (dequantized - layer.weight.double()).abs()
    assert (weight_error <= quantized.scales.double()[:, None] / 2 + 1e-12).all()
    bound = quantized.scales.double() / 2 * x.double().abs().sum(-1, keepdim=True) + bfloat16_matmul_bound(x, dequantized, y)
    error = (y.double() - layer(x).double()).abs()
    assert (error <= bound).all(), f"max error {error.max():.3g}, bound {bound.min():.3g}..{bound.max():.3g}"


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_layer_matches_float_within_half_a_step(group_size):
    layer = float_layer()
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(1))
    scheme = parse_quantize(f"int4-g{group_size}")
    quantized = QuantizedLinear.from_float(layer, layer.weight.detach(), scheme, torch.float32)
    # The CPU kernel's packed layout: two values a byte; scales and zeros per (group, channel).
    assert quantized.weight.dtype == torch.uint8 and quantized.weight.shape == (48, 128)
    assert quantized.scales.shape == (256 // group_size, 48, 2)
    q, scales_and_zeros = quantize_int4(layer.weight.detach(), group_size, torch.bfloat16)
    assert torch.equal(quantized.unpacked_int4(), q) and torch.equal(quantized.scales, scales_and_zeros)
    assert q.min() >= 0 and q.max() <= 15
    dequantized = dequantize_int4(q, scales_and_zeros, group_size)
    y = quantized(x)
    assert y.dtype == torch.float32
    assert ((y.double() - x.double() @ dequantized.T).abs() <= bfloat16_matmul_bound(x, dequantized, y)).all()
    # Per element at most half a step of its group; per output the sum over groups of step / 2 * sum|x|.
    steps = scales_and_zeros[..., 0].double().T  # (out, groups)
    weight_error = (dequantized - layer.weight.double()).abs()
    assert (weight_error <= steps.repeat_interleave(group_size, dim=1) / 2 + 1e-6).all()
    x_groups = x.double().abs().unflatten(-1, (-1, group_size)).sum(-1)  # (..., groups)
    bound = x_groups @ steps.T / 2 + bfloat16_matmul_bound(x, dequantized, y)
    error = (y.double() - layer(x).double()).abs()
    assert (error <= bound + 1e-5).all(), f"max error {error.max():.3g}, bound {bound.min():.3g}..{bound.max():.3g}"


@pytest.mark.parametrize("shape", [(5, 256), (2, 3, 256)], ids=["2d", "3d"])
def test_w8a8_layer_is_the_integer_product_of_its_quantized_operands(shape):
    layer = float_layer()
    # Rows of very different ranges, a zero row and one outlier: each row gets its own scale.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, shape[-2])[:, None]
    x[..., 0, :] = 0
    x[..., -1, 7] = 1e3
    quantized = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize("w8a8"), torch.float32)
    assert quantized.weight.dtype == torch.int8 and quantized.scales.dtype == torch.float32
    assert matmul_dtype(torch.device("cpu"), torch.bfloat16, quantized.scheme) == torch.float32
    x2d = x.reshape(-1, 256)
    xq, x_scales = quantize_rows(x2d)
    # Each input element is off by at most half its row's step, and each row's largest reaches +-127.
    assert xq.dtype == torch.int8 and x_scales.shape == (x2d.shape[0], 1)
    assert ((xq.double() * x_scales.double() - x2d.double()).abs() <= x_scales.double() / 2 * (1 + 1e-6)).all()
    nonzero = x2d.abs().amax(1) > 0
    assert (xq.abs().amax(1)[nonzero] == 127).all() and (xq[~nonzero] == 0).all()
    # The integer products summed exactly, then both scales: against float64.
    y = quantized(x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == torch.float32
    exact = (xq.double() @ quantized.weight.double().T) * x_scales.double() * quantized.scales.double()
    torch.testing.assert_close(y.double().reshape(-1, 48), exact, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(int8_dynamic_matmul(x2d, quantized.weight, quantized.scales), y.reshape(-1, 48))
    # Against the float layer: half a weight step times sum|x|, plus half an input step times sum|w|.
    w = layer.weight.double()
    bound = (quantized.scales.double() / 2 * x2d.double().abs().sum(-1, keepdim=True)
             + x_scales.double() / 2 * w.abs().sum(-1) + 1e-5 * (x2d.double().abs() @ w.abs().T))
    error = (y.double().reshape(-1, 48) - x2d.double() @ w.T).abs()
    assert (error <= bound).all(), f"max error {error.max():.3g}, bound {bound.min():.3g}..{bound.max():.3g}"


def test_w8a8_keeps_the_model_dtype_at_its_edges():
    layer = float_layer()
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    exact = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize("w8a8"), torch.float32)(x)
    for dtype in (torch.bfloat16, torch.float16):
        quantized = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize("w8a8"), dtype)
        y = quantized(x.to(dtype))
        assert quantized.scales.dtype == torch.float32 and y.dtype == dtype
        assert ((y.float() - exact).abs().max() / exact.abs().max()).item() < 0.02


def test_every_model_dtype_computes_in_bfloat16_on_cpu():
    """torch's CPU kernels are fast for bfloat16 inputs only: a layer of any model dtype keeps bfloat16
    scales and returns the dtype it was given."""
    layer = float_layer()
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    for name in ("int8", "int4-g32"):
        for dtype, tolerance in ((torch.bfloat16, 0.1), (torch.float16, 0.02)):
            quantized = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize(name), dtype)
            assert quantized.scales.dtype == torch.bfloat16
            y = quantized(x.to(dtype))
            assert y.dtype == dtype
            exact = QuantizedLinear.from_float(layer, layer.weight.detach(), parse_quantize(name), torch.float32)(x)
            relative = ((y.float() - exact).abs().max() / exact.abs().max()).item()
            assert relative < tolerance, f"{name} {dtype}: relative error {relative:.3g}"


def test_int4_unpacking_inverts_the_cpu_packing():
    q = torch.randint(0, 16, (96, 128), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert int4_layout(96, 128, torch.device("cpu")).shape == (96 * 128,)
    layer = QuantizedLinear(128, 96, QuantScheme(4, 32), packed, torch.ones(4, 96, 2))
    assert torch.equal(layer.unpacked_int4(), q)


def test_invalid_arguments_raise_value_error(tiny_checkpoints, tiny_tokenizer_path):
    for bad in ("int3", "int4-g16", "int4-g100", "INT8", 8, "int4g32"):
        with pytest.raises(ValueError, match="quantize"):
            parse_quantize(bad)
    assert parse_quantize("int4") == QuantScheme(4, 128) and parse_quantize(None) is None
    with pytest.raises(ValueError, match="quantize='int5' is not a known scheme"):
        build(tiny_checkpoints[(None, 1)], tiny_tokenizer_path, quantize="int5")
    # dim 64: in_features 64 is not a multiple of 128.
    with pytest.raises(ValueError, match=r"in_features=64 .* not a multiple of the group size 128"):
        build(tiny_checkpoints[(None, 1)], tiny_tokenizer_path, quantize="int4")
    with pytest.raises(ValueError, match="in_features=48 is not a multiple of the int4 group size 32"):
        quantize_int4(torch.randn(16, 48), 32, torch.float32)
    with pytest.raises(ValueError, match="CPU and CUDA only"):
        check_support(QuantScheme(8), torch.device("mps"), torch.float16)
    assert parse_quantize("w8a8") == QuantScheme(8, activations=8) and parse_quantize("w8a8").name == "w8a8"
    with pytest.raises(ValueError, match="quantize='w8a8' runs on CPU only .* use quantize='int8' there"):
        check_support(parse_quantize("w8a8"), torch.device("cuda"), torch.bfloat16)
    with pytest.raises(ValueError, match="save_quantized needs a model built with"):
        save_quantized(build(tiny_checkpoints[(None, 1)], tiny_tokenizer_path), "unused")


@pytest.mark.parametrize("native_kernels", [False, True], ids=["torch-only", "native"])
def test_w8a8_warns_on_a_cpu_where_torchs_int8_matmul_is_a_plain_loop(monkeypatch, native_kernels):
    """Unless llama's own int8 kernels (AVX2) take w8a8's products there."""
    import warnings

    import llama.quantize as quantization
    from llama import native

    monkeypatch.setattr(native, "ready", lambda: native_kernels)
    cpu, w8a8 = torch.device("cpu"), parse_quantize("w8a8")
    for vnni, amx, fast in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert quantization.fast_int8_matmul() is fast
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_support(w8a8, cpu, torch.float32)
            check_support(parse_quantize("int8"), cpu, torch.float32)  # weight-only: fast anywhere, never warned
        assert len(caught) == (0 if fast or native_kernels else 1), [str(w.message) for w in caught]
        if caught:
            assert "quantize='w8a8' on this CPU" in str(caught[0].message)
            assert "quantize='int8' is the fast choice" in str(caught[0].message)


@pytest.mark.parametrize("quantize,max_error,mean_error,agreement", [("int8", 0.05, 0.01, 0.9), ("w8a8", 0.05, 0.01, 0.9),
                                                                    ("int4-g32", 0.4, 0.08, 0.75)])
def test_quantized_model_is_close_to_float(tiny_checkpoints, tiny_tokenizer_path, quantize, max_error, mean_error, agreement):
    """Bounds are relative to the largest float logit. The tiny model's weights are Gaussian and
    only 64 wide: harder to quantize than a trained model's, int4 most of all."""
    ckpt = tiny_checkpoints[(2, 1)]  # GQA
    reference = build(ckpt, tiny_tokenizer_path).model(TOKENS, 0)
    generator = build(ckpt, tiny_tokenizer_path, quantize=quantize)
    attention, feed_forward = generator.model.layers[0].attention, generator.model.layers[0].feed_forward
    for layer in (attention.wq, attention.wk, attention.wv, attention.wo, feed_forward.w1, feed_forward.w2, feed_forward.w3):
        assert isinstance(layer, QuantizedLinear) and layer.scheme.name == quantize
    # The output layer is 8-bit under every scheme (w8a8 under w8a8, else int8); embeddings and norms stay float.
    output_scheme = "w8a8" if quantize == "w8a8" else "int8"
    assert isinstance(generator.model.output, QuantizedLinear) and generator.model.output.scheme.name == output_scheme
    assert generator.model.norm.weight.dtype == torch.float32
    assert generator.model.tok_embeddings.weight.dtype == torch.float32
    logits = generator.model(TOKENS, 0)
    scale = reference.abs().max()
    error = (logits - reference).abs() / scale
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    report = f"{quantize}: max |error| {error.max():.4f}, mean {error.mean():.4f} (of max |logit| {scale:.2f}), top-1 agreement {top1:.3f}"
    assert error.max() < max_error and error.mean() < mean_error and top1 >= agreement, report
    tokens, _ = generator.generate([[1, 10, 11], [1, 20]], max_gen_len=8, temperature=0)
    assert all(len(t) == 8 and all(0 <= i < generator.model.vocab_size for i in t) for t in tokens)
    assert isinstance(generator.text_completion(["Hello"], max_gen_len=4, temperature=0)[0]["generation"], str)


@pytest.mark.parametrize("quantize", ["int8", "w8a8", "int4-g32"])
def test_save_and_reload(tmp_path, tiny_checkpoints, tiny_tokenizer_path, quantize):
    generator = build(tiny_checkpoints[(2, 1)], tiny_tokenizer_path, quantize=quantize)
    out = save_quantized(generator, tmp_path / "q")
    assert sorted(p.name for p in out.iterdir()) == ["params.json", "quantization.json", "quantized.00.pt"]
    info = json.loads((out / "quantization.json").read_text())
    assert info["quantize"] == quantize and info["shards"] == 1 and info["dtype"] == "float32"
    state = torch.load(out / "quantized.00.pt", weights_only=True)
    assert state["layers.0.attention.wq.qweight"].dtype == (torch.uint8 if quantize == "int4-g32" else torch.int8)
    assert state["output.qweight"].dtype == torch.int8 and "output.weight" not in state
    output_scheme = layer_scheme("output", parse_quantize(quantize)).name
    assert info["version"] == 2 and info["output_quantize"] == output_scheme and "output" in info["quantized_layers"]

    with pytest.raises(CheckpointError, match="cannot be resharded or converted"):
        reshard(str(out), str(tmp_path / "resharded"), shards=1)
    expected = generator.model(TOKENS, 0)
    for requested in (None, quantize):
        reloaded = build(out, tiny_tokenizer_path, quantize=requested)
        assert torch.equal(reloaded.model(TOKENS, 0), expected)
    # Another dtype: floats and scales are cast, the integer weights kept.
    assert build(out, tiny_tokenizer_path, dtype="bfloat16").model(TOKENS, 0).isfinite().all()

    other = "int8" if quantize != "int8" else "w8a8"
    with pytest.raises(ValueError, match=f"quantized as '{quantize}', not the requested quantize='{other}'"):
        build(out, tiny_tokenizer_path, quantize=other)
    resharded = shutil.copytree(out, tmp_path / "two-shards")
    (resharded / "quantization.json").write_text(json.dumps({**info, "shards": 2}))
    with pytest.raises(ValueError, match="quantized for 2 model-parallel rank.* has 1; resharding quantized weights is not supported"):
        build(resharded, tiny_tokenizer_path)
    (resharded / "quantization.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid quantization description"):
        build(resharded, tiny_tokenizer_path)


def test_version_1_directory_loads_with_its_float_output_layer(tmp_path, tiny_checkpoints, tiny_tokenizer_path):
    """Directories written before the output layer was quantized (version 1) load as they were: output float."""
    generator = build(tiny_checkpoints[(2, 1)], tiny_tokenizer_path, quantize="int8")
    out = save_quantized(generator, tmp_path / "q")
    info = json.loads((out / "quantization.json").read_text())
    state = torch.load(out / "quantized.00.pt", weights_only=True)
    float_output = dequantize_int8(state.pop("output.qweight"), state.pop("output.scales")).float()
    torch.save({**state, "output.weight": float_output}, out / "quantized.00.pt")
    info = {**info, "version": 1, "quantized_layers": info["quantized_layers"][:-1]}
    del info["output_quantize"]
    (out / "quantization.json").write_text(json.dumps(info))

    reloaded = build(out, tiny_tokenizer_path)
    assert isinstance(reloaded.model.output, nn.Linear) and torch.equal(reloaded.model.output.weight, float_output)
    assert isinstance(reloaded.model.layers[0].attention.wq, QuantizedLinear)
    # Only the output layer differs from the version 2 model: its input and output rounded to bfloat16.
    torch.testing.assert_close(reloaded.model(TOKENS, 0), generator.model(TOKENS, 0), rtol=0.02, atol=0.05)
    (out / "quantization.json").write_text(json.dumps({**info, "version": 3}))
    with pytest.raises(CheckpointError, match="not a version 1 or 2 .* upgrade it"):
        build(out, tiny_tokenizer_path)


def test_quantized_shard_not_matching_the_model(tmp_path, tiny_checkpoints, tiny_tokenizer_path):
    out = save_quantized(build(tiny_checkpoints[(2, 1)], tiny_tokenizer_path, quantize="int8"), tmp_path / "q")
    shard = out / "quantized.00.pt"
    state = torch.load(shard, weights_only=True)
    torch.save({**state, "layers.0.attention.wq.scales": state["layers.0.attention.wq.scales"][:-1]}, shard)
    with pytest.raises(CheckpointError, match=r"quantized.00.pt'?: tensor 'layers.0.attention.wq.scales' has shape \(63,\)"):
        build(out, tiny_tokenizer_path)
    del state["layers.1.feed_forward.w2.qweight"]
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.feed_forward.w2.qweight'\]"):
        build(out, tiny_tokenizer_path)


ODD_SHAPES_SCRIPT = """
import sys, torch
from torch import nn
from llama.quantize import QuantizedLinear, check_shapes, dequantize_int8, dequantize_int4, parse_quantize
torch.manual_seed(0)
scheme = parse_quantize(sys.argv[1])
device, dtype = torch.device(sys.argv[2]), getattr(torch, sys.argv[3])
for in_features in (8, 24, 40, 88, 100, 172, 200, 256):
    for out_features in (8, 12, 172, 64):
        layer = nn.Linear(in_features, out_features, bias=False, device=device)
        model = nn.Module(); model.layers = nn.ModuleList([nn.Module()]); model.layers[0].attention = nn.Module()
        model.layers[0].attention.wq = layer
        try:
            check_shapes(model, scheme, device)
        except ValueError as e:
            assert "use" in str(e), e  # refused, saying what to use instead
            print("refused", in_features, out_features)
            continue
        q = QuantizedLinear.from_float(layer, layer.weight.detach(), scheme, dtype)
        if scheme.bits == 8:
            w = dequantize_int8(q.weight, q.scales)
        else:
            w = dequantize_int4(q.unpacked_int4(), q.scales, scheme.group_size)
        for rows in (1, 5):
            x = torch.randn(rows, in_features, device=device, dtype=dtype)
            y, ref = q(x).double(), x.double() @ w.double().T
            assert torch.isfinite(y).all(), (in_features, out_features, rows)
            assert (y - ref).abs().max() <= 0.03 * ref.abs().max() + 1e-6, (in_features, out_features, rows)
        print("ran", in_features, out_features)
"""


@pytest.mark.parametrize("quantize", ["int8", "w8a8", "int4-g32", "int4-g64", "int4-g128", "int4-g256"])
def test_odd_and_small_dimensions_run_correctly_or_are_refused(quantize):
    """In a subprocess: a kernel that crashes fails this test instead of killing the suite."""
    check_odd_shapes(quantize, "cpu", "float32")


def check_odd_shapes(quantize: str, device: str, dtype: str) -> None:
    """Every layer shape of ODD_SHAPES_SCRIPT runs within the quantization bound on device, or is refused."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "-c", ODD_SHAPES_SCRIPT, quantize, device, dtype], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    ran = proc.stdout.count("ran")
    assert ran + proc.stdout.count("refused") == 32
    if quantize in ("int8", "w8a8"):
        assert ran == 32  # int8 runs every shape (odd in_features are padded to the kernel's multiple of 16)


def test_int8_on_the_trained_stories_model_keeps_its_greedy_story(stories260k):
    """stories260K's feed-forward has in_features 172, which crashed torch's CPU int8 kernel before padding."""
    build = lambda **kw: Llama.build(str(stories260k), str(stories260k / "tokenizer.model"), 256, 2, device="cpu", **kw)  # noqa: E731
    float_story = build().text_completion(["Once upon a time"], temperature=0, max_gen_len=40)[0]["generation"]
    for quantize in ("int8", "w8a8"):
        story = build(quantize=quantize).text_completion(["Once upon a time"], temperature=0, max_gen_len=40)[0]["generation"]
        assert story.startswith(", there was a little girl named Lily")
        assert story[:60] == float_story[:60], quantize
