import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama.model import Linear, ModelArgs, Part, RMSNorm, Transformer, apply_rope, rope_table
from llama.parallel import parallelize
from tests.checkpoints import random_state_dict, tiny_params
from tests.naive_llama import naive_logits, rotary

VOCAB = 96


def build(params: dict, sd: dict, **args) -> Transformer:
    model = Transformer(ModelArgs(**params, **{"max_seq_len": 32, "max_batch_size": 4, **args}))
    model.load_state_dict(sd)
    model.setup_cache()
    return model.eval()


@pytest.fixture(params=[None, 2], ids=["mha", "gqa"])
def tiny(request):
    params = tiny_params(VOCAB, n_kv_heads=request.param)
    sd = random_state_dict(params, seed=1)
    return params, sd, build(params, sd)


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data = torch.randn(16)
    x = torch.randn(3, 5, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rmsnorm_normalises_low_precision_input_in_float32():
    torch.manual_seed(0)
    norm = RMSNorm(16).to(torch.bfloat16)
    x = (torch.randn(4, 16) * 300).to(torch.bfloat16)  # squares overflow nothing in float32
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rotary_matches_complex_rotation_of_interleaved_pairs(theta):
    torch.manual_seed(0)
    x = torch.randn(1, 7, 3, 8)
    out = apply_rope(x, rope_table(8, 7, theta))
    torch.testing.assert_close(out[0].double(), rotary(x[0].double(), theta), atol=1e-5, rtol=1e-5)


def test_rotary_pair_by_hand():
    # Position 2, pair 1 of a head_dim 4 vector rotates by 2 * 10000^(-2/4) = 0.02 radians.
    x = torch.zeros(1, 3, 1, 4)
    x[0, 2, 0] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = apply_rope(x, rope_table(4, 3))[0, 2, 0]
    angle = torch.tensor(0.02)
    torch.testing.assert_close(out, torch.stack([torch.tensor(2.0).cos(), torch.tensor(2.0).sin(), angle.cos(), angle.sin()]))


@pytest.mark.parametrize(
    "dim,multiplier,multiple_of,hidden",
    [(4096, None, 256, 11008), (5120, None, 256, 13824), (8192, 1.3, 4096, 28672)],
    ids=["7B", "13B", "70B"],
)
def test_ffn_hidden_size_of_real_models(dim, multiplier, multiple_of, hidden):
    assert ModelArgs(dim=dim, ffn_dim_multiplier=multiplier, multiple_of=multiple_of).ffn_hidden_dim == hidden


def test_forward_matches_naive_implementation(tiny):
    params, sd, model = tiny
    tokens = [1, 5, 9, 33, 2, 70, 11, 4, 60, 3]
    logits = model(torch.tensor([tokens]), 0)
    assert logits.dtype == torch.float32 and logits.shape == (1, len(tokens), VOCAB)
    torch.testing.assert_close(logits[0].double(), naive_logits(sd, params, tokens), atol=1e-4, rtol=1e-4)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa_params = tiny_params(VOCAB, n_kv_heads=2)
    sd = random_state_dict(gqa_params, seed=3)
    mha_sd = dict(sd)
    head_dim, n_rep = 64 // 4, 2
    for i in range(gqa_params["n_layers"]):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            # kv head j serves query heads j * n_rep ... j * n_rep + n_rep - 1
            mha_sd[key] = sd[key].view(2, head_dim, 64).repeat_interleave(n_rep, dim=0).reshape(64, 64)
    tokens = torch.tensor([[1, 7, 3, 50, 22, 9]])
    gqa = build(gqa_params, sd)(tokens, 0)
    mha = build(tiny_params(VOCAB), mha_sd)(tokens, 0)
    torch.testing.assert_close(gqa, mha, atol=1e-5, rtol=1e-5)


def test_incremental_decoding_with_cache_equals_full_forward(tiny):
    params, sd, model = tiny
    tokens = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4, 60, 3], [1, 8, 8, 40, 12, 7, 19, 90, 6, 5]])
    full = model(tokens, 0)
    # A 4-token prefill, then a 3-token chunk, then one token at a time.
    pieces = [model(tokens[:, :4], 0), model(tokens[:, 4:7], 4)]
    pieces += [model(tokens[:, p : p + 1], p) for p in range(7, 10)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    # And against the explicit formula (float64 softmax attention, repeated kv heads, no cache).
    for row, logits in zip(tokens.tolist(), torch.cat(pieces, dim=1)):
        torch.testing.assert_close(logits.double(), naive_logits(sd, params, row), atol=1e-4, rtol=1e-4)


def test_last_only_gives_the_last_positions_logits(tiny):
    _, _, model = tiny
    tokens = torch.tensor([[1, 5, 9, 33, 2], [1, 8, 8, 40, 12]])
    full = model(tokens[:, :3], 0), model(tokens[:, 3:], 3)
    last = model(tokens[:, :3], 0, last_only=True), model(tokens[:, 3:], 3, last_only=True)
    for f, l in zip(full, last):
        assert l.shape == (2, 1, model.vocab_size)
        torch.testing.assert_close(l, f[:, -1:], atol=1e-5, rtol=1e-5)


def test_smaller_batch_after_larger_reuses_cache_rows_correctly(tiny):
    _, _, model = tiny
    a = torch.tensor([[1, 5, 9, 33], [1, 8, 8, 40]])
    model(a, 0)
    b = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(b, 0), build(tiny[0], tiny[1])(b, 0))


def test_positions_beyond_max_seq_len_are_refused(tiny):
    _, _, model = tiny
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.ones(1, 33, dtype=torch.long), 0)


def test_direct_construction_and_dtype_cast_keep_rotary_table_float32():
    params = tiny_params(VOCAB)
    model = Transformer(ModelArgs(**params, max_seq_len=16, max_batch_size=2))
    model.setup_cache()
    model = model.to(torch.bfloat16)
    logits = model(torch.tensor([[1, 2, 3]]), 0)
    assert logits.dtype == torch.float32 and model.rope.dtype == torch.float32
    assert model.layers[0].attention.cache.k.dtype == torch.bfloat16


def test_bad_model_args_are_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelArgs(**tiny_params(-1)))
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        Transformer(ModelArgs(**tiny_params(VOCAB, n_kv_heads=3)))


def test_tokens_at_their_own_positions_and_slots_equal_full_forwards(tiny):
    """One forward path: prompt chunks written to chosen cache slots, then one decode step whose rows
    sit at different positions, read in place (slots None) or gathered from any slots."""
    params, sd, model = tiny
    seqs = [[1, 5, 9, 33, 2, 70, 11], [1, 8, 8, 40]]
    reference = build(params, sd)
    expected = [reference(torch.tensor([s]), 0)[0, -1] for s in seqs]
    for slots in ([0, 1], [3, 1]):
        # Prefill each sequence but its last token into its slot: two chunks for the first one.
        model(torch.tensor([seqs[0][:2]]), 0, torch.tensor([slots[0]]))
        model(torch.tensor([seqs[0][2:6]]), 2, torch.tensor([slots[0]]))
        model(torch.tensor([seqs[1][:3]]), 0, torch.tensor([slots[1]]))
        step_tokens, positions = torch.tensor([[seqs[0][6]], [seqs[1][3]]]), torch.tensor([[6], [3]])
        rows = None if slots == [0, 1] else torch.tensor(slots)
        # Over the whole cache, and over only the first 7 positions (just past the furthest row): the same step.
        for kv_len in (None, 7):
            logits = model(step_tokens, positions, rows, kv_len)[:, -1]
            assert logits.shape == (2, VOCAB) and logits.dtype == torch.float32
            torch.testing.assert_close(logits[0], expected[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits[1], expected[1], atol=1e-5, rtol=1e-5)
    cache_len = model.cache_shape[1]
    for kv_len in (0, cache_len + 1):
        with pytest.raises(ValueError, match=f"kv_len={kv_len} must be between 1 and the cache's length {cache_len}"):
            model(step_tokens, positions, None, kv_len)


def test_parts_of_one_forward_call_equal_separate_calls(tiny):
    """forward_parts: a prompt chunk from position 0, a mid-prompt chunk, chunks of two rows padded to one
    length (output_index) and a decode step over gathered slots, in one call, give what each gives alone and
    write the same cache; each row against the float64 formula too."""
    params, sd, model = tiny
    seqs = [[1, 5, 9, 33, 2, 70, 11], [1, 8, 8, 40], [1, 3, 4, 50, 60, 7], [1, 20, 21, 22, 23]]
    alone = build(params, sd)
    # Slots 0 and 1 hold a sequence's first tokens already; slots 2 and 3 start now.
    for m in (model, alone):
        m(torch.tensor([seqs[0][:6]]), 0, torch.tensor([0]))
        m(torch.tensor([seqs[1][:2]]), 0, torch.tensor([1]))
    parts = [
        Part(torch.tensor([seqs[0][6:7]]), torch.tensor([[6]]), torch.tensor([0]), kv_len=7),  # a decode row
        Part(torch.tensor([seqs[1][2:4]]), 2, torch.tensor([1]), last_only=True),  # the rest of a prompt
        Part(torch.tensor([seqs[2], seqs[3] + [0]]), torch.arange(6).expand(2, 6), torch.tensor([2, 3]), kv_len=6,
             output_index=torch.tensor([5, 4])),  # two prompts, the shorter padded
    ]
    got = model.forward_parts(parts)
    expected = [alone.forward(p.tokens, p.start_pos, p.slots, p.kv_len, p.last_only, p.output_index) for p in parts]
    assert [g.shape for g in got] == [(1, 1, VOCAB), (1, 1, VOCAB), (2, 1, VOCAB)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    for logits, seq in zip([got[0][0, 0], got[1][0, 0], got[2][0, 0], got[2][1, 0]], seqs):
        torch.testing.assert_close(logits.double(), naive_logits(sd, params, seq)[-1], atol=1e-4, rtol=1e-4)
    for layer, other in zip(model.layers, alone.layers):  # the padding's keys land past the shorter prompt's end
        torch.testing.assert_close(layer.attention.cache.k[:, :, :5], other.attention.cache.k[:, :, :5])
        torch.testing.assert_close(layer.attention.cache.v[:, :, :5], other.attention.cache.v[:, :, :5])


def test_forward_needs_a_cache_set_up_first():
    model = Transformer(ModelArgs(**tiny_params(VOCAB), max_seq_len=16, max_batch_size=2))
    with pytest.raises(ValueError, match="setup_cache"):
        model(torch.tensor([[1, 2, 3]]), 0)
    model.setup_cache()
    with pytest.raises(ValueError, match="3 rows exceeds the KV cache's 2 slots"):
        model(torch.tensor([[1]] * 3), 0)


def test_the_model_is_built_for_one_device():
    """Plain layers and every head; llama.parallel.parallelize splits a model only under a model-parallel group."""
    model = Transformer(ModelArgs(**tiny_params(VOCAB, n_kv_heads=2), max_seq_len=16, max_batch_size=2))
    attention = model.layers[0].attention
    assert (attention.n_local_heads, attention.n_local_kv_heads) == (4, 2)
    assert type(attention.wk) is Linear and attention.wk.weight.shape == (32, 64)  # llama.model's nn.Linear
    assert type(model.tok_embeddings) is nn.Embedding and type(model.output) is Linear
    assert parallelize(model) is model and type(attention.wq) is Linear and attention.n_local_heads == 4


@pytest.mark.parametrize("rows", [1, 8, 12, 32, 33])
def test_linear_equals_the_formula_for_any_number_of_rows(rows):
    torch.manual_seed(0)
    layer = Linear(48, 20, bias=False)
    x = torch.randn(rows, 1, 48)  # a decode step's (batch, 1, dim)
    expected = (x.double() @ layer.weight.double().t()).float()
    got = layer(x)
    assert got.shape == (rows, 1, 20)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    layer.to(torch.bfloat16)  # other dtypes keep F.linear
    torch.testing.assert_close(layer(x.bfloat16()), F.linear(x.bfloat16(), layer.weight), atol=0, rtol=0)


def test_linear_stays_a_plain_linear_in_compiled_graphs():
    """Inductor matches F.linear to its own (oneDNN, template) kernels: the eager operand order must not reach it."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    layer = Linear(48, 20, bias=False)
    torch._dynamo.reset()
    torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(8, 1, 48))
    assert any("linear" in t for t in seen) and not any("matmul" in t for t in seen), seen


def test_linear_leaves_a_traced_batch_dynamic():
    """Tracing never compares the row count (the eager operand-order switch): that would guard the batch size, and
    export would refuse a dynamic batch whose example has 8 rows, as the compiled CPU decode step's has."""
    torch.manual_seed(0)
    layer = Linear(48, 20, bias=False)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(layer, (torch.randn(8, 1, 48),), dynamic_shapes=({0: batch},))
    for rows in (1, 3, 8):
        x = torch.randn(rows, 1, 48)
        torch.testing.assert_close(program.module()(x), F.linear(x, layer.weight), atol=1e-6, rtol=1e-6)
