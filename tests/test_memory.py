"""Memory: host memory while loading (shards are memory-mapped, so a rank holds about its own weights, not the
files too), and sizes that cannot fit refused before anything is allocated."""

import sys

import pytest
import torch

from llama import Llama
from llama.model import ModelArgs, Transformer
from tests.checkpoints import random_state_dict, tiny_params, write_checkpoint
from tests.conftest import REPO, check_exit, launch


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc")
@pytest.mark.parametrize("shards", [1, 2])
def test_peak_memory_of_loading_is_about_the_model(tmp_path, tiny_vocab, tiny_tokenizer_path, shards):
    params = tiny_params(tiny_vocab, dim=512, n_layers=8, n_heads=8, multiple_of=256)
    ckpt = write_checkpoint(tmp_path / "ckpt", {**params, "vocab_size": -1}, random_state_dict(params), shards)
    proc = launch([REPO / "tests" / "memory_probe.py", ckpt, tiny_tokenizer_path])
    check_exit(proc)
    peak, model_bytes = map(int, proc.stdout.split()[-2:])
    assert model_bytes > 80e6
    # Reading the shards into memory before building the weights would take about twice the model.
    limit = (0.15 if shards == 1 else 1.25) * model_bytes
    assert peak < limit, f"loading took {peak / 1e6:.0f} MB of anonymous memory for a {model_bytes / 1e6:.0f} MB model"


def build(ckpt, tokenizer, max_seq_len, max_batch_size):
    return Llama.build(str(ckpt), str(tokenizer), max_seq_len=max_seq_len, max_batch_size=max_batch_size, device="cpu")


def test_a_kv_cache_beyond_memory_is_refused_before_the_weights_load(tiny_checkpoints, tiny_tokenizer_path, monkeypatch):
    """max_batch_size=10**9 asked the allocator for terabytes once the weights were loaded."""

    def load(*args, **kwargs):
        raise AssertionError("the weights were read before the KV cache size was checked")

    monkeypatch.setattr("llama.loading.load_weights", load)
    with pytest.raises(ValueError, match=r"max_seq_len=32 and max_batch_size=1000000000 need a KV cache of [\d.]+ GB on "
                                         r"cpu, but it has [\d.]+ [GM]B available; lower max_batch_size \(at most \d+ fits "
                                         r"with max_seq_len=32\) or max_seq_len \(at most \d+ fits with max_batch_size=1000000000\)"):
        build(tiny_checkpoints[(2, 1)], tiny_tokenizer_path, 32, 10**9)


def test_a_rotary_table_beyond_memory_is_refused_before_it_is_built(tiny_checkpoints, tiny_tokenizer_path, monkeypatch):
    """The table holds 2 * max_seq_len positions on the CPU: max_seq_len=10**7 took gigabytes on a tiny model."""
    monkeypatch.setattr("llama.memory.available_memory", lambda device: 50_000_000)
    # 2 * 10**6 positions x 8 frequencies x cos, sin x 4 bytes: 128 MB.
    with pytest.raises(ValueError, match=r"max_seq_len=1000000 needs a rotary table of 128.00 MB on cpu, but it has "
                                         r"50.00 MB available; lower max_seq_len \(at most 390625 fits\)"):
        build(tiny_checkpoints[(2, 1)], tiny_tokenizer_path, 10**6, 1)
    with pytest.raises(ValueError, match="rotary table"):
        Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=8, max_seq_len=10**6))


def test_the_sizes_said_to_fit_do(tiny_checkpoints, tiny_tokenizer_path, monkeypatch):
    from llama.memory import kv_cache_bytes

    ckpt = tiny_checkpoints[(2, 1)]
    per_slot = kv_cache_bytes(2, 1, 2, 1000, 16, torch.float32)  # 2 layers, 2 kv heads of 16, 1000 positions
    monkeypatch.setattr("llama.memory.available_memory", lambda device: 10 * per_slot + per_slot // 2)
    with pytest.raises(ValueError, match=r"lower max_batch_size \(at most 10 fits with max_seq_len=1000\) or "
                                         r"max_seq_len \(at most 954 fits with max_batch_size=11\)"):
        build(ckpt, tiny_tokenizer_path, 1000, 11)
    assert build(ckpt, tiny_tokenizer_path, 1000, 10).model.cache_shape == (10, 1000)
    assert build(ckpt, tiny_tokenizer_path, 954, 11).model.cache_shape == (11, 954)
    with pytest.raises(ValueError, match=r"at most 954 fits"):
        build(ckpt, tiny_tokenizer_path, 955, 11)
