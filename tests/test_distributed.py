"""Model parallelism over 2 CPU processes (Gloo, launched by torchrun) against one process."""

import shutil

import pytest
import torch

from tests.conftest import REPO, check_exit, launch

WORKER = REPO / "tests" / "mp_worker.py"


def run_ranks(ckpt_dir, tokenizer_path, nproc, out_prefix, quantize=None):
    check_exit(launch([WORKER, ckpt_dir, tokenizer_path, out_prefix] + ([quantize] if quantize else []), nproc))
    return [torch.load(f"{out_prefix}.rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.fixture(scope="module")
def one_rank(tiny_checkpoints, tiny_tokenizer_path, tmp_path_factory):
    """What one process computes, per kv-head count."""
    out = tmp_path_factory.mktemp("mp1")
    return {kv: run_ranks(tiny_checkpoints[(kv, 1)], tiny_tokenizer_path, 1, out / f"kv{kv}")[0] for kv in (None, 2)}


@pytest.mark.parametrize(
    "kv_heads,shards,ranks",
    [(None, 2, 2), (2, 2, 2), (None, 1, 2), (2, 2, 4)],
    ids=["mha-2shards-2ranks", "gqa-2shards-2ranks", "mha-1shard-2ranks", "gqa-2shards-4ranks-replicated-kv"],
)
def test_many_ranks_equal_one_rank(tmp_path, tiny_checkpoints, tiny_tokenizer_path, one_rank, kv_heads, shards, ranks):
    single = one_rank[kv_heads]
    results = run_ranks(tiny_checkpoints[(kv_heads, shards)], tiny_tokenizer_path, ranks, tmp_path / "mp")
    rank0 = results[0]
    torch.testing.assert_close(rank0["logits"], single["logits"], atol=1e-5, rtol=1e-5)
    assert rank0["greedy"][0] == single["greedy"][0]
    torch.testing.assert_close(torch.tensor(sum(rank0["greedy"][1], [])), torch.tensor(sum(single["greedy"][1], [])), atol=1e-4, rtol=0)
    # Seeded sampling picks the same tokens on any world size, and every rank agrees on them.
    assert rank0["sampled"] == single["sampled"]
    assert rank0["seeded"] == single["seeded"] and rank0["streamed"] == single["streamed"]
    for other in results[1:]:
        assert torch.equal(other["logits"], rank0["logits"])
        for key in ("greedy", "sampled", "seeded", "streamed"):
            assert other[key] == rank0[key]
    _check_layout(results, single, tiny_checkpoints[(kv_heads, ranks)] if (kv_heads, ranks) in tiny_checkpoints else None)


def _check_layout(results, single, same_shards_checkpoint):
    """llama.parallel's split: fairscale's layers, this rank's heads, and the per-rank shapes of Meta's shards."""
    ranks = len(results)
    assert set(single["layout"]["types"].values()) == {"Embedding", "Linear"}
    n_heads, n_kv_heads = single["layout"]["heads"]
    kinds = {"tok_embeddings": "ParallelEmbedding", "layers.0.attention.wo": "RowParallelLinear",
             "layers.0.feed_forward.w2": "RowParallelLinear"}
    for r, result in enumerate(results):
        layout = result["layout"]
        assert layout["types"] == {name: kinds.get(name, "ColumnParallelLinear") for name in layout["types"]}
        assert layout["heads"] == (n_heads // ranks, max(1, n_kv_heads // ranks))
        if same_shards_checkpoint is not None:
            shard = torch.load(same_shards_checkpoint / f"consolidated.{r:02d}.pth", weights_only=True)
            assert layout["shapes"] == {k: tuple(v.shape) for k, v in shard.items()}


@pytest.fixture(scope="module")
def one_rank_quantized(tiny_checkpoints, tiny_tokenizer_path, tmp_path_factory):
    """What one process computes with each quantization scheme (MHA)."""
    out = tmp_path_factory.mktemp("mp1q")
    return {q: run_ranks(tiny_checkpoints[(None, 1)], tiny_tokenizer_path, 1, out / q, q)[0] for q in ("int8", "w8a8", "int4-g32")}


@pytest.mark.parametrize("quantize", ["int8", "w8a8", "int4-g32"])
def test_quantized_many_ranks(tmp_path, tiny_checkpoints, tiny_tokenizer_path, one_rank, one_rank_quantized, quantize):
    """Each rank quantizes its own slices. Column-parallel slices are whole output channels, so they
    quantize as in one process. Row-parallel ones (wo, w2) split the input features: int4's groups
    of 32 never straddle the split (96 and 32 features per rank), so int4 quantizes as in one process
    and its logits differ only by rounding (on CPU each rank's partial sum of a row-parallel layer is
    rounded to bfloat16 before the sum); int8's per-channel scale is taken over each rank's half of
    the row, so int8 differs slightly from one process and is held to a bound against the float model; so does
    w8a8, whose row-parallel layers also scale each token's input over the rank's half."""
    single, float_logits = one_rank_quantized[quantize], one_rank[None]["logits"]
    results = run_ranks(tiny_checkpoints[(None, 2)], tiny_tokenizer_path, 2, tmp_path / "mp", quantize)
    rank0 = results[0]
    error = (rank0["logits"] - float_logits).abs()
    single_error = (single["logits"] - float_logits).abs()
    if quantize == "int4-g32":
        rounding = (rank0["logits"] - single["logits"]).abs()
        assert rounding.max() <= 0.1 * single_error.max() and rounding.mean() <= 0.1 * single_error.mean(), (
            f"2-rank vs 1-rank int4 logits differ by max {rounding.max():.4f} mean {rounding.mean():.4f}; "
            f"quantization error max {single_error.max():.4f} mean {single_error.mean():.4f}"
        )
    else:
        assert not torch.equal(rank0["logits"], single["logits"])  # the row-parallel scales differ
        assert error.max() <= 2 * single_error.max() and error.mean() <= 2 * single_error.mean(), (
            f"2-rank {quantize} error max {error.max():.4f} mean {error.mean():.4f}; "
            f"1-rank max {single_error.max():.4f} mean {single_error.mean():.4f}"
        )
    # Saved per rank and built again from the quantized directory: the same model.
    assert torch.equal(rank0["reloaded_logits"], rank0["logits"])
    for other in results[1:]:
        assert torch.equal(other["logits"], rank0["logits"])
        for key in ("greedy", "sampled", "seeded", "streamed"):
            assert other[key] == rank0[key]


def test_a_rank_failing_to_load_ends_the_whole_job(tmp_path, tiny_checkpoints, tiny_tokenizer_path):
    ckpt = shutil.copytree(tiny_checkpoints[(2, 2)], tmp_path / "ckpt")
    shard = ckpt / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    proc = launch([WORKER, ckpt, tiny_tokenizer_path, tmp_path / "out"], nproc=2, timeout=120)  # a hang fails here
    assert proc.returncode != 0
    assert "consolidated.01.pth" in proc.stderr and "truncated or corrupt" in proc.stderr
