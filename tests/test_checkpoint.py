import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.checkpoint import CheckpointError, MetaCheckpoint, rank_plan
from llama.convert import reshard
from llama.parallel import split_dim
from tests.checkpoints import SPLIT_DIM, random_state_dict, tiny_params, write_checkpoint


@pytest.fixture
def ckpt(tmp_path, tiny_checkpoints) -> Path:
    """A private copy of the 1-shard GQA checkpoint to break."""
    return Path(shutil.copytree(tiny_checkpoints[(2, 1)], tmp_path / "ckpt"))


def build(ckpt_dir, tokenizer, **kwargs):
    return Llama.build(str(ckpt_dir), str(tokenizer), max_seq_len=32, max_batch_size=2, device="cpu", **kwargs)


def test_loads_with_defaults_and_ignores_rope_freqs(ckpt, tiny_tokenizer_path):
    shard = ckpt / "consolidated.00.pth"
    sd = torch.load(shard, weights_only=True)
    reference = build(ckpt, tiny_tokenizer_path).model(torch.tensor([[1, 5, 6]]), 0)
    sd["rope.freqs"] = torch.zeros(8)
    torch.save(sd, shard)
    generator = build(ckpt, tiny_tokenizer_path)
    assert generator.model.tok_embeddings.weight.dtype == torch.float32
    torch.testing.assert_close(generator.model(torch.tensor([[1, 5, 6]]), 0), reference)


def test_dtype_by_name_and_by_torch_dtype(ckpt, tiny_tokenizer_path):
    for dtype in ("bfloat16", torch.bfloat16):
        model = build(ckpt, tiny_tokenizer_path, dtype=dtype).model
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model(torch.tensor([[1, 5, 6]]), 0).dtype == torch.float32


def test_missing_directory_and_files(tmp_path, ckpt, tiny_tokenizer_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(tmp_path / "nowhere", tiny_tokenizer_path)
    (ckpt / "consolidated.00.pth").rename(ckpt / "weights.bak")
    with pytest.raises(FileNotFoundError, match=r"no \*\.pth"):
        build(ckpt, tiny_tokenizer_path)
    (ckpt / "weights.bak").rename(ckpt / "consolidated.00.pth")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        build(ckpt, tmp_path / "no.model")
    (ckpt / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json"):
        build(ckpt, tiny_tokenizer_path)


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"dim": 64, "n_layers": 2}), r"missing keys \['n_heads'\]"),
        (json.dumps({**tiny_params(-1), "n_experts": 8}), r"unknown keys \['n_experts'\]"),
        (json.dumps({**tiny_params(-1), "dim": "64"}), "dim='64' must be a positive integer"),
        (json.dumps({**tiny_params(-1), "n_layers": 0}), "n_layers=0"),
        (json.dumps({**tiny_params(-1), "norm_eps": -1.0}), "norm_eps=-1.0 must be a positive number"),
        ('{"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "rope_theta": Infinity}',
         "rope_theta=inf must be a finite number from 1 to 1e"),
        (json.dumps({**tiny_params(-1), "rope_theta": 1e-300}), "rope_theta=1e-300 must be a finite number from 1"),
        (json.dumps({**tiny_params(-1), "norm_eps": 5.0}), "norm_eps=5.0 must be a finite number"),
        (json.dumps({**tiny_params(-1), "ffn_dim_multiplier": 1e9}), "ffn_dim_multiplier=1000000000.0 must be a finite"),
    ],
)
def test_bad_params_json(ckpt, tiny_tokenizer_path, content, match):
    (ckpt / "params.json").write_text(content)
    with pytest.raises(CheckpointError, match=match):
        build(ckpt, tiny_tokenizer_path)


def test_params_json_not_matching_the_weights(ckpt, tiny_tokenizer_path):
    (ckpt / "params.json").write_text(json.dumps(tiny_params(-1)))  # says MHA, weights are GQA
    with pytest.raises(CheckpointError, match=r"tensor 'layers.0.attention.wk.weight' has shape \(32, 64\)"):
        build(ckpt, tiny_tokenizer_path)
    (ckpt / "params.json").write_text(json.dumps(tiny_params(-1, n_kv_heads=2)))
    shard = ckpt / "consolidated.00.pth"
    sd = torch.load(shard, weights_only=True)
    del sd["layers.1.feed_forward.w2.weight"]
    torch.save(sd, shard)
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.feed_forward.w2.weight'\]"):
        build(ckpt, tiny_tokenizer_path)


@pytest.mark.parametrize("change,match", [
    ({"n_layers": 3}, "params.json' has 3 layers, the checkpoint 2"),
    ({"n_layers": 1_000_000}, "params.json' has 1000000 layers, the checkpoint 2"),
    ({"dim": 1_000_000, "n_heads": 4}, "params.json' has dim 1000000, the checkpoint 64"),
])
def test_params_json_is_compared_with_the_tensors_before_building(ckpt, tiny_tokenizer_path, monkeypatch, change, match):
    """A million layers in params.json for a 2-layer checkpoint used to build a million layers first."""
    (ckpt / "params.json").write_text(json.dumps(tiny_params(-1, n_kv_heads=2, **change)))

    def built(*args, **kwargs):
        raise AssertionError("the model was built before params.json was checked")

    monkeypatch.setattr("llama.model.Transformer.__init__", built)
    with pytest.raises(CheckpointError, match=match):
        build(ckpt, tiny_tokenizer_path)
    with pytest.raises(CheckpointError, match=match):  # and convert reads it the same way
        reshard(str(ckpt), str(ckpt.parent / "out"), shards=1)


def test_unexpected_keys(ckpt, tiny_tokenizer_path):
    shard = ckpt / "consolidated.00.pth"
    sd = torch.load(shard, weights_only=True)
    sd["layers.0.attention.bias"] = torch.zeros(4)
    torch.save(sd, shard)
    with pytest.raises(CheckpointError, match=r"unexpected \['layers.0.attention.bias'\]"):
        build(ckpt, tiny_tokenizer_path)


def test_tokenizer_not_matching_the_checkpoint(ckpt, tiny_tokenizer_path, tiny_vocab):
    (ckpt / "params.json").write_text(json.dumps(tiny_params(tiny_vocab + 1, n_kv_heads=2)))
    with pytest.raises(CheckpointError, match=f"vocab_size={tiny_vocab + 1}.*{tiny_vocab} pieces"):
        build(ckpt, tiny_tokenizer_path)
    other = tiny_params(tiny_vocab + 4, n_kv_heads=2)
    write_checkpoint(ckpt, {**other, "vocab_size": -1}, random_state_dict(other))
    with pytest.raises(CheckpointError, match=f"embeddings for {tiny_vocab + 4} tokens"):
        build(ckpt, tiny_tokenizer_path)


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["mha", "gqa"])
def test_two_shards_load_on_one_rank(tiny_checkpoints, tiny_tokenizer_path, kv_heads):
    tokens = torch.tensor([[1, 5, 9, 33, 2, 70]])
    one = build(tiny_checkpoints[(kv_heads, 1)], tiny_tokenizer_path).model(tokens, 0)
    two = build(tiny_checkpoints[(kv_heads, 2)], tiny_tokenizer_path).model(tokens, 0)
    assert torch.equal(one, two)


def test_shards_from_different_models_are_refused(ckpt, tiny_tokenizer_path, tiny_vocab):
    other = tiny_params(tiny_vocab, n_kv_heads=2, dim=128)
    torch.save(random_state_dict(other), ckpt / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth.*shards are from different models"):
        build(ckpt, tiny_tokenizer_path)


def test_model_parallel_without_torchrun_says_how_to_launch(ckpt, tiny_tokenizer_path):
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        build(ckpt, tiny_tokenizer_path, model_parallel_size=2)


class Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_code_is_refused(ckpt, tiny_tokenizer_path, capsys):
    shard = ckpt / "consolidated.00.pth"
    sd = torch.load(shard, weights_only=True)
    torch.save({**sd, "extra": Payload()}, shard)
    with pytest.raises(CheckpointError, match="consolidated.00.pth.*pickle code"):
        build(ckpt, tiny_tokenizer_path)
    assert "pickle code ran" not in capsys.readouterr().out


def test_truncated_and_foreign_files_are_refused(ckpt, tiny_tokenizer_path):
    shard = ckpt / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="consolidated.00.pth.*truncated or corrupt"):
        build(ckpt, tiny_tokenizer_path)
    torch.save([torch.zeros(2)], shard)
    with pytest.raises(CheckpointError, match="dict of tensors"):
        build(ckpt, tiny_tokenizer_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:banana"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"model_parallel_size": 0}, "model_parallel_size"),
    ],
)
def test_bad_build_arguments(ckpt, tiny_tokenizer_path, kwargs, match):
    args = {"max_seq_len": 32, "max_batch_size": 2, "device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=match):
        Llama.build(str(ckpt), str(tiny_tokenizer_path), **args)


def test_rope_theta_from_params_json_and_long_context(tmp_path, tiny_tokenizer_path, tiny_vocab):
    """Code Llama's params.json sets rope_theta=1e6 and is used with contexts up to 16k."""
    from tests.naive_llama import naive_logits

    params = tiny_params(tiny_vocab, n_kv_heads=2, rope_theta=1e6)
    sd = random_state_dict(params, seed=5)
    ckpt = write_checkpoint(tmp_path / "code", params, sd)
    generator = Llama.build(str(ckpt), str(tiny_tokenizer_path), max_seq_len=16384, max_batch_size=1, device="cpu")
    assert generator.model.params.rope_theta == 1e6
    tokens = [1, 5, 9, 33, 2, 70, 11]
    logits = generator.model(torch.tensor([tokens]), 0)[0].double()
    torch.testing.assert_close(logits, naive_logits(sd, params, tokens), atol=1e-4, rtol=1e-4)
    with pytest.raises(AssertionError):  # the theta matters
        torch.testing.assert_close(logits, naive_logits(sd, {**params, "rope_theta": 1e4}, tokens), atol=1e-4, rtol=1e-4)


def test_split_dims_are_those_of_metas_shards(tiny_vocab):
    for key in random_state_dict(tiny_params(tiny_vocab, n_kv_heads=2)):
        assert split_dim(key) == SPLIT_DIM[key.split(".")[-2]], key


def test_a_tensor_that_does_not_split_over_the_ranks_is_refused(tiny_checkpoints):
    with pytest.raises(CheckpointError, match="'tok_embeddings.weight' of size 64 along dim 1 does not split over 3 ranks"):
        rank_plan(MetaCheckpoint(tiny_checkpoints[(None, 1)]), 4, 16, 0, 3)


def test_only_consolidated_nn_pth_files_are_shards(ckpt, tiny_tokenizer_path):
    shutil.copy(ckpt / "consolidated.00.pth", ckpt / "consolidated.00.backup.pth")
    with pytest.raises(CheckpointError, match=r"holds 'consolidated.00.backup.pth' beside its shards.*move it out"):
        build(ckpt, tiny_tokenizer_path)
    (ckpt / "consolidated.00.backup.pth").rename(ckpt / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match="has 2 shards but no consolidated.01.pth"):
        build(ckpt, tiny_tokenizer_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["consolidated.00.pth", "params.json", "tokenizer"])
def test_a_fifo_is_refused_before_it_is_opened(ckpt, tiny_tokenizer_path, name):
    """Opening a FIFO for reading waits for a writer: the build would hang forever."""
    tokenizer = tiny_tokenizer_path
    if name == "tokenizer":
        tokenizer = path = ckpt / "tokenizer.model"
    else:
        path = ckpt / name
        path.unlink()
    os.mkfifo(path)

    def hung(signum, frame):
        raise TimeoutError(f"the build waited on the FIFO {name}")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pytest.raises(CheckpointError, match=f"{name}.* is a FIFO \\(named pipe\\), not a regular file"):
            build(ckpt, tokenizer)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
