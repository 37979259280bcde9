import json

import pytest
import torch

from llama import Llama
from llama.checkpoint import MetaCheckpoint, load_params, rank_slices
from llama.convert import reshard
from tests.conftest import check_exit, launch


def tensors(ckpt_dir):
    return [torch.load(p, weights_only=True) for p in sorted(ckpt_dir.glob("consolidated.*.pth"))]


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_reshard_round_trips_bit_exactly(tmp_path, tiny_checkpoints, kv_heads):
    src = tiny_checkpoints[(kv_heads, 2)]
    reshard(str(src), str(tmp_path / "one"), shards=1)
    reshard(str(tmp_path / "one"), str(tmp_path / "two"), shards=2)
    original, back = tensors(src), tensors(tmp_path / "two")
    assert len(back) == 2
    for a, b in zip(original, back):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (one,) = tensors(tmp_path / "one")
    (reference,) = tensors(tiny_checkpoints[(kv_heads, 1)])
    assert all(torch.equal(one[k], reference[k]) for k in reference)
    assert load_params(tmp_path / "one")["vocab_size"] == one["tok_embeddings.weight"].shape[0]


def test_reshard_with_dtype_change_loads(tmp_path, tiny_checkpoints, tiny_tokenizer_path):
    reshard(str(tiny_checkpoints[(2, 1)]), str(tmp_path / "bf16"), shards=2, dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for shard in tensors(tmp_path / "bf16") for t in shard.values())
    g = Llama.build(str(tmp_path / "bf16"), str(tiny_tokenizer_path), 32, 1, device="cpu")
    assert g.model(torch.tensor([[1, 2, 3]]), 0).isfinite().all()


def test_reshard_refuses_bad_requests_and_leaves_nothing_behind(tmp_path, tiny_checkpoints):
    src = tiny_checkpoints[(2, 2)]
    with pytest.raises(ValueError, match="do not split n_heads=4 and n_kv_heads=2"):
        reshard(str(src), str(tmp_path / "out"), shards=4)
    with pytest.raises(ValueError, match="shards"):
        reshard(str(src), str(tmp_path / "out"), shards=0)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        reshard(str(src), str(tmp_path / "exists"), shards=1)


def test_world_larger_than_kv_heads_replicates_each_kv_head(tiny_checkpoints):
    reader = MetaCheckpoint(tiny_checkpoints[(2, 2)])
    whole = rank_slices(reader, 2, 16, 0, 1)["layers.0.attention.wk.weight"]  # 2 kv heads of 16 rows
    per_rank = [rank_slices(reader, 2, 16, r, 4)["layers.0.attention.wk.weight"] for r in range(4)]
    # 4 query heads over 4 ranks: query head r uses kv head r // 2.
    for r, rows in enumerate(per_rank):
        assert torch.equal(rows, whole[(r // 2) * 16 : (r // 2 + 1) * 16])


def test_convert_command_line(tmp_path, tiny_checkpoints):
    check_exit(launch(["-m", "llama.convert", "reshard", tiny_checkpoints[(None, 2)], tmp_path / "mp1", "--shards", "1"]))
    assert json.loads((tmp_path / "mp1" / "params.json").read_text())["dim"] == 64
    assert len(tensors(tmp_path / "mp1")) == 1


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_meta_to_hf_to_meta_is_bit_exact(tmp_path, tiny_checkpoints, tiny_tokenizer_path, kv_heads):
    from llama.convert import to_hf, to_meta

    src = tiny_checkpoints[(kv_heads, 2)]
    to_hf(str(src), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file() and list((tmp_path / "hf").glob("*.safetensors"))
    to_meta(str(tmp_path / "hf"), str(tmp_path / "meta"), shards=2)
    for a, b in zip(tensors(src), tensors(tmp_path / "meta")):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokens = torch.tensor([[1, 5, 9, 33]])
    logits = [Llama.build(str(d), str(tiny_tokenizer_path), 16, 1, device="cpu").model(tokens, 0) for d in (src, tmp_path / "hf")]
    assert torch.equal(*logits)
