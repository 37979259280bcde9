"""Model parallelism over 2 CPU processes (Gloo, launched by torchrun) against one process."""

import shutil

import pytest
import torch

from tests.conftest import REPO, check_exit, launch

WORKER = REPO / "tests" / "mp_worker.py"


def run_ranks(ckpt_dir, tokenizer_path, nproc, out_prefix):
    check_exit(launch([WORKER, ckpt_dir, tokenizer_path, out_prefix], nproc))
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


def test_a_rank_failing_to_load_ends_the_whole_job(tmp_path, tiny_checkpoints, tiny_tokenizer_path):
    ckpt = shutil.copytree(tiny_checkpoints[(2, 2)], tmp_path / "ckpt")
    shard = ckpt / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[:1000])
    proc = launch([WORKER, ckpt, tiny_tokenizer_path, tmp_path / "out"], nproc=2, timeout=120)  # a hang fails here
    assert proc.returncode != 0
    assert "consolidated.01.pth" in proc.stderr and "truncated or corrupt" in proc.stderr
