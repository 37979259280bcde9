"""The CUDA paths: CUDA-graph decoding, per-request generators on the device, the CUDA int8/int4 kernels.

Skipped where there is no CUDA device (CI). LLAMA_TEST_DEVICE=cpu runs the same checks on the CPU,
which is how the checks themselves are tested without a GPU.
"""

import os

import pytest
import torch
import torch._dynamo.utils

from llama import Llama
from llama.compiled import CompiledDecodeStep
from llama.quantize import QuantizedLinear, dequantize_int4, dequantize_int8, parse_quantize

DEVICE = os.environ.get("LLAMA_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device (or LLAMA_TEST_DEVICE=cpu)"
)
PROMPTS = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31, 32]]


def build(tiny_checkpoints, tiny_tokenizer_path, **kwargs) -> Llama:
    return Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 48, 3, device=DEVICE, **kwargs)


def test_generation_on_the_device_equals_the_cpu(tiny_checkpoints, tiny_tokenizer_path):
    cpu = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 48, 3, device="cpu")
    here = build(tiny_checkpoints, tiny_tokenizer_path, dtype="float32")
    expected, got = (g.generate(PROMPTS, max_gen_len=12, temperature=0, logprobs=True) for g in (cpu, here))
    assert got[0] == expected[0]
    torch.testing.assert_close(torch.tensor(sum(got[1], [])), torch.tensor(sum(expected[1], [])), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_decode_equals_eager_in_one_graph(tiny_checkpoints, tiny_tokenizer_path, dtype, monkeypatch):
    monkeypatch.setattr(CompiledDecodeStep, "kv_bucket", 8)  # attended lengths 8..32 all met below
    monkeypatch.setenv("LLAMA_COMPILE_CACHE", "off")  # on CPU: in-process torch.compile, whose graphs are counted
    eager = build(tiny_checkpoints, tiny_tokenizer_path, dtype=dtype)
    compiled = build(tiny_checkpoints, tiny_tokenizer_path, dtype=dtype, compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for batch, n in ((3, 28), (1, 9), (2, 12)):
        e = eager.generate(PROMPTS[:batch], max_gen_len=n, temperature=0, logprobs=True)
        c = compiled.generate(PROMPTS[:batch], max_gen_len=n, temperature=0, logprobs=True)
        if dtype == "float32":
            assert c[0] == e[0]
        # Logprobs of the tokens both chose, within the dtype's rounding.
        tolerance = 1e-4 if dtype == "float32" else 0.1
        for ct, et, cl, el in zip(c[0], e[0], c[1], e[1]):
            same = next((i for i, (a, b) in enumerate(zip(ct, et)) if a != b), len(ct))
            torch.testing.assert_close(torch.tensor(cl[:same]), torch.tensor(el[:same]), atol=tolerance, rtol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("compile", [False, True])
def test_seeded_sampling_on_the_device_does_not_depend_on_the_batch(tiny_checkpoints, tiny_tokenizer_path, compile):
    """Each seeded request draws from its own device generator: alone or beside others, the same tokens."""
    g = build(tiny_checkpoints, tiny_tokenizer_path, dtype="float32", compile=compile)
    alone = [g.generate([p], max_gen_len=20, temperature=0.8, seed=3)[0][0] for p in PROMPTS]
    assert g.generate(PROMPTS, max_gen_len=20, temperature=0.8, seed=3)[0] == alone
    assert len(set(map(tuple, alone))) == len(alone)


@pytest.mark.parametrize("quantize", ["int8", "int4-g32", "int4-g128"])
def test_quantized_layers_on_the_device_match_their_dequantized_weights(quantize):
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 64, bias=False).to(DEVICE, torch.bfloat16)
    scheme = parse_quantize(quantize)
    quantized = QuantizedLinear.from_float(layer, layer.weight.detach(), scheme, torch.bfloat16).to(DEVICE)
    x = torch.randn(3, 256, device=DEVICE, dtype=torch.bfloat16)
    if scheme.bits == 8:
        dequantized = dequantize_int8(quantized.weight, quantized.scales)
    else:  # unpacking the device's own int4 layout is tested too
        dequantized = dequantize_int4(quantized.unpacked_int4(), quantized.scales, scheme.group_size)
    reference = x.double() @ dequantized.double().T
    y = quantized(x)
    assert y.dtype == torch.bfloat16 and y.device.type == torch.device(DEVICE).type
    # bfloat16 output: a relative error of a few 2^-8 of the output's scale.
    torch.testing.assert_close(y.double(), reference, atol=0.02 * reference.abs().max().item(), rtol=0.02)


@pytest.mark.parametrize("quantize", ["int8", "int4-g32"])
def test_quantized_generation_on_the_device(tiny_checkpoints, tiny_tokenizer_path, quantize):
    g = build(tiny_checkpoints, tiny_tokenizer_path, dtype="bfloat16", quantize=quantize)
    compiled = build(tiny_checkpoints, tiny_tokenizer_path, dtype="bfloat16", quantize=quantize, compile=True)
    tokens = g.generate(PROMPTS, max_gen_len=8, temperature=0)[0]
    assert [len(t) for t in tokens] == [8, 8, 8]
    assert len(compiled.generate(PROMPTS, max_gen_len=8, temperature=0)[0]) == 3


@pytest.mark.parametrize("quantize", ["int8", "int4-g32", "int4-g128"])
def test_odd_layer_shapes_on_the_device_run_or_are_refused(quantize):
    """The device's own int8/int4 kernels on odd and small shapes, in a subprocess (a crash fails the test)."""
    from tests.test_quantize import check_odd_shapes

    check_odd_shapes(quantize, DEVICE, "bfloat16")
