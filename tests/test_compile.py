"""torch.compile'd decoding (CPU inductor here): same outputs as eager, one graph for every step."""

import pytest
import torch
import torch._dynamo.utils

from llama import Llama
from tests.conftest import REPO, check_exit, launch


@pytest.mark.parametrize("attention_block", [16, None], ids=["flex", "sdpa"])
@pytest.mark.parametrize("ahead_of_time", [True, False], ids=["ahead-of-time", "in-process"])
def test_compiled_decode_equals_eager_without_recompiling(tiny_checkpoints, tiny_tokenizer_path, monkeypatch, tmp_path, ahead_of_time,
                                                          attention_block):
    import llama.compiled
    from llama.compiled import CompiledDecodeStep

    # Attend to the cache in steps of 8 positions: lengths 8 and 16 (SDPA only: flex needs two blocks), 24 and 32 are
    # all met below.
    monkeypatch.setattr(CompiledDecodeStep, "kv_bucket", 8)
    # flex_attention in blocks of 16 keys (3 in the cache), on oneDNN's matmuls whatever this CPU (as on AVX-512). Not
    # blocks of 8: with this model's head dim of 16, torch 2.13's compiled CPU flex_attention gets those wrong on AVX2
    # (outputs off by O(1) against its own eager form; blocks of 16 and more, and other head dims, agree to 1e-7).
    monkeypatch.setattr(CompiledDecodeStep, "attention_block", attention_block)
    monkeypatch.setattr(llama.compiled, "_onednn_matmuls", lambda model: True)
    monkeypatch.setenv("LLAMA_COMPILE_CACHE", str(tmp_path) if ahead_of_time else "off")
    packages = []
    compile_package = torch._inductor.aoti_compile_and_package
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: packages.append(1) or compile_package(*a, **k))

    # 8 slots: the package is exported from an example of 8 rows (oneDNN packs for 8), the batch size at which a
    # size test in the traced code would pin the batch dimension and ahead-of-time compiling would fail.
    def build(compile):
        return Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 48, 8, device="cpu", compile=compile)

    eager, compiled = build(False), build(True)
    prompts = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31, 32]]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    expected = eager.generate(prompts, max_gen_len=28, temperature=0, logprobs=True)
    got = compiled.generate(prompts, max_gen_len=28, temperature=0, logprobs=True)
    again = compiled.generate([p[::-1] for p in prompts], max_gen_len=6, temperature=0)
    assert got[0] == expected[0]
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    assert again[0] == eager.generate([p[::-1] for p in prompts], max_gen_len=6, temperature=0)[0]
    # Batches of 1 and 2, other lengths: a (1, 1) slice of the token buffer would carry a new row stride each time.
    for batch, n in ((1, 5), (1, 9), (2, 7)):
        assert compiled.generate(prompts[:batch], max_gen_len=n, temperature=0)[0] == eager.generate(prompts[:batch], max_gen_len=n, temperature=0)[0]
    # Streaming goes through the same compiled step.
    streamed = "".join(compiled.stream_text_completion("Hello world", max_gen_len=8, temperature=0))
    assert streamed == eager.text_completion(["Hello world"], max_gen_len=8, temperature=0)[0]["generation"]
    assert compiled.engine._decode._module.attention_block == attention_block
    # Every decode step of every call, at every batch size and attended length, ran the one graph compiled first.
    if not ahead_of_time:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1 and not packages
        return
    assert len(packages) == 1 and len(list(tmp_path.glob("decode-*.pt2"))) == 1
    # The package takes a single row as it is (torch.compile in-process needs a second, padding row).
    step, rows = compiled.engine._decode, []
    ((made_for, package),) = step._packages.items()
    step._packages[made_for] = lambda tokens, *rest: rows.append(tokens.shape[0]) or package(tokens, *rest)
    assert compiled.generate(prompts[:1], max_gen_len=3, temperature=0)[0] == eager.generate(prompts[:1], max_gen_len=3, temperature=0)[0]
    assert rows == [1, 1]
    # The KV cache is the step's input, not a constant stored in the package (it would be GBs of zeros).
    (package,) = tmp_path.glob("decode-*.pt2")
    assert not [name for name in torch._inductor.aoti_load_package(str(package)).get_constant_fqns() if "cache" in name]
    # A second model from the same checkpoint (a new process, as far as the step knows) loads the package.
    again = build(True)
    assert again.generate(prompts, max_gen_len=28, temperature=0)[0] == expected[0]
    assert len(packages) == 1


def test_row_block_mask_reads_each_rows_keys_only():
    """The decode step's flex_attention mask: each row attends the keys up to its own position (as SDPA with the mask
    by position does), and lists no block of keys past it, so those are never read."""
    from torch.nn.attention.flex_attention import flex_attention

    from llama.compiled import row_block_mask

    kv_len, block = 40, 8
    ends = torch.tensor([0, 7, 8, 20, 46, 3])  # one per cache slot; the last slot has no row in this step
    mask = row_block_mask(ends, 5, kv_len, block)
    reads = (mask.kv_num_blocks + mask.full_kv_num_blocks).flatten().tolist()
    assert reads == [1, 1, 2, 3, 5]  # ceil((end + 1) / block), the end clamped to kv_len - 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 2, n, 16, generator=g) for n in (1, kv_len, kv_len))
    by_position = (torch.arange(kv_len) <= ends[:5, None])[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=by_position)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=mask), expected)


def test_compiled_step_follows_a_cache_allocated_anew(tiny_checkpoints, tiny_tokenizer_path):
    """After setup_cache() replaces every layer's KV cache, the compiled step reads and writes the new
    one (dynamo's guards on the buffers; dropping them would keep the frozen step on the old cache)."""
    from llama.compiled import CompiledDecodeStep

    model = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 16, 2, device="cpu").model
    step = CompiledDecodeStep(model)
    tokens, positions = torch.tensor([[5], [9]]), torch.tensor([[8], [8]])
    for prompt in ([[1, 2, 3, 4, 5, 6, 7, 8]] * 2, [[1, 30, 31, 32, 33, 34, 35, 36]] * 2):
        model.setup_cache()  # new, zeroed cache tensors: the second time, after the step has compiled
        model.forward(torch.tensor(prompt), 0)
        old_cache = model.layers[0].attention.cache.k
        got = step(tokens, positions)
        assert old_cache[:, :, 8].abs().sum() > 0  # the step wrote position 8 into the current cache
        model.setup_cache()
        model.forward(torch.tensor(prompt), 0)
        torch.testing.assert_close(got, model.forward(tokens, positions)[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantize", ["int8", "w8a8"])
@pytest.mark.parametrize("template_can", [True, False], ids=["template", "fallback"])
@pytest.mark.parametrize("ahead_of_time", [True, False], ids=["ahead-of-time", "in-process"])
def test_quantized_step_on_cpu_uses_the_gemm_template_or_torch_kernels(tiny_checkpoints, tiny_tokenizer_path, monkeypatch, tmp_path,
                                                                      ahead_of_time, template_can, quantize):
    """Quantized layers go to inductor's C++ GEMM template; where it cannot do a quantized matmul (int4 without
    AVX-512, for one), torch's kernel serves (for w8a8, oneDNN's int8 linear that freezing puts in its place).
    llama's native int8 kernel (AVX2 CPUs) is off here: test_native_kernels_in_the_step has it."""
    import torch._inductor.lowering  # noqa: F401 (first: importing quantized_lowerings alone is a circular import)
    import torch._inductor.quantized_lowerings as quantized_lowerings
    from llama.compiled import CompiledDecodeStep

    monkeypatch.setenv("LLAMA_NATIVE_KERNELS", "off")
    g = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 16, 2, device="cpu", quantize=quantize)
    tokens, positions = torch.tensor([[5], [9]]), torch.tensor([[3], [7]])
    g.model.forward(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * 2), 0)  # fill the cache
    expected = g.model.forward(tokens, positions)[:, -1]

    if not template_can:
        monkeypatch.setattr(quantized_lowerings, "use_cpp_gemm_template", lambda *args, **kwargs: False)
    monkeypatch.setenv("LLAMA_COMPILE_CACHE", str(tmp_path) if ahead_of_time else "off")
    torch._dynamo.reset()
    step = CompiledDecodeStep(g.model)
    with torch.compiler.config.patch(force_disable_caches=True):  # a cached graph would skip the lowering
        got = step(tokens, positions)
    # int8 matmuls compute in bfloat16 on CPU: torch's kernels give eager's numbers, the template rounds its
    # products in another order (within two bfloat16 ulps of the largest logit; as far from a float32 model
    # with the dequantized weights as eager is). w8a8 sums integers exactly, but the compiled step may round
    # an input element that lies half-way between two steps the other way.
    atol = 1e-4 if not template_can and quantize == "int8" else 2 ** -7 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-4)
    # w8a8's matmuls are oneDNN's int8 linear after freezing: without the template that kernel runs as it is.
    assert step._gemm_backends == ("CPP" if template_can or quantize == "w8a8" else "CPP,ATEN")
    if not (ahead_of_time and template_can):
        return
    # A step of one row: a package of its own for weight-only int8 (the template's small-batch kernel), the same
    # package as for more rows under w8a8.
    with torch.compiler.config.patch(force_disable_caches=True):
        one = step(tokens[:1], positions[:1])
    torch.testing.assert_close(one, expected[:1], atol=atol, rtol=1e-4)
    assert sorted(one_row for _, _, one_row in step._packages) == ([False, True] if quantize == "int8" else [False])
    assert len(list(tmp_path.glob("decode-*.pt2"))) == len(step._packages)


@pytest.mark.parametrize("kind,ahead_of_time", [("int8", True), ("w8a8", True), ("bfloat16", True), ("bfloat16", False)],
                         ids=["int8", "w8a8", "bfloat16", "bfloat16-in-process"])
def test_native_kernels_in_the_step(tiny_checkpoints, tiny_tokenizer_path, monkeypatch, tmp_path, ahead_of_time, kind):
    """int8 and w8a8 layers and a bfloat16 model's linear layers on llama's native kernels (forced on, as on AVX2
    CPUs): the compiled step calls them as eager does, with eager's numbers, and one package serves every row count.
    In the process likewise (bfloat16 only, where the layer's choice of kernel goes through dynamo, not export).
    A process without the kernels compiles a package of its own (int8)."""
    from llama import native
    from llama.compiled import CompiledDecodeStep

    monkeypatch.setenv(native.VARIABLE, "on")
    if not native.wanted():
        pytest.skip("this CPU has no AVX2")
    quantize, dtype = (None, "bfloat16") if kind == "bfloat16" else (kind, "float32")
    g = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 16, 2, device="cpu", dtype=dtype, quantize=quantize)
    assert native.ready() and (kind == "bfloat16" or g.model.output.native_int8)
    tokens, positions = torch.tensor([[5], [9]]), torch.tensor([[3], [7]])
    g.model.forward(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * 2), 0)  # fill the cache
    expected = g.model.forward(tokens, positions)[:, -1]
    monkeypatch.setenv("LLAMA_COMPILE_CACHE", str(tmp_path) if ahead_of_time else "off")
    torch._dynamo.reset()
    step = CompiledDecodeStep(g.model)
    assert not step.one_row_package
    # bfloat16: the compiled step fuses the norms and rotary embedding, rounding where eager rounds otherwise; w8a8: it
    # may round an input element half-way between two steps the other way.
    atol = 1e-4 if kind == "int8" else 2 ** -7 * expected.abs().max().item()
    with torch.compiler.config.patch(force_disable_caches=True):
        torch.testing.assert_close(step(tokens, positions), expected, atol=atol, rtol=1e-4)
        torch.testing.assert_close(step(tokens[:1], positions[:1]), expected[:1], atol=atol, rtol=1e-4)
    if ahead_of_time:
        assert [one_row for _, _, one_row in step._packages] == [False] and len(list(tmp_path.glob("decode-*.pt2"))) == 1
    if kind == "int8":
        # A package made with the native kernels is never loaded without them (it would call ops not registered).
        monkeypatch.setenv(native.VARIABLE, "off")
        torch._dynamo.reset()
        plain = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 16, 2, device="cpu", dtype=dtype, quantize=quantize)
        plain.model.forward(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]] * 2), 0)
        other = CompiledDecodeStep(plain.model)
        with torch.compiler.config.patch(force_disable_caches=True):
            torch.testing.assert_close(other(tokens, positions), expected, atol=2 ** -6 * expected.abs().max().item(), rtol=1e-3)
        assert len(list(tmp_path.glob("decode-*.pt2"))) == 2


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_cpu_step_kernels_by_dtype_and_cpu(monkeypatch, capability, tiny_checkpoints, tiny_tokenizer_path):
    """On AVX-512, a float32 model's matmuls go to oneDNN (no template, no autotuning); bfloat16's and quantized ones',
    and every model's on a CPU without AVX-512, to the template."""
    from llama.compiled import CompiledDecodeStep

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    float32 = "" if capability == "AVX512" else "CPP"
    for dtype, quantize, backends in (("float32", None, float32), ("bfloat16", None, "CPP"), ("float32", "int8", "CPP"),
                                      ("float32", "w8a8", "CPP")):
        g = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 16, 2, device="cpu", dtype=dtype, quantize=quantize)
        step = CompiledDecodeStep(g.model)
        assert step._gemm_backends == backends and ("max_autotune" in step._cpu_configs()) == bool(backends)


def test_compiled_decode_under_model_parallel(tmp_path, tiny_checkpoints, tiny_tokenizer_path):
    """Two ranks (Gloo): fairscale's collectives split the step into several graphs; outputs still equal eager
    (with flex_attention, as the float32 step on AVX-512 CPUs has it)."""
    out = tmp_path / "out"
    check_exit(launch([REPO / "tests" / "compile_worker.py", tiny_checkpoints[(2, 2)], tiny_tokenizer_path, out], nproc=2, timeout=600))
    ranks = [torch.load(f"{out}.rank{r}.pt") for r in range(2)]
    for result in ranks:
        assert result["attention_block"] == 16
        for (eager_tokens, eager_lps), (tokens, lps) in zip(result["eager"], result["compiled"]):
            assert tokens == eager_tokens
            torch.testing.assert_close(torch.tensor(sum(lps, [])), torch.tensor(sum(eager_lps, [])), atol=1e-4, rtol=0)
    assert ranks[0]["compiled"] == ranks[1]["compiled"]
