"""Hugging Face Llama directories: reading them as Meta checkpoints, writing them from Meta weights."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llama.checkpoint import CheckpointError, MetaCheckpoint, rank_slices
from llama.generation import Llama
from llama.hf import HFCheckpoint, meta_to_hf_name, params_from_config, resolve_tokenizer_path
from llama.hf_write import save_hf
from llama.loading import open_checkpoint
from llama.model import ModelArgs, apply_rope, rope_table
from tests.checkpoints import random_state_dict, tiny_params

KV = [None, 2]  # multi-head and grouped-query attention
MAX_SEQ_LEN = 32


def _args(params: dict) -> ModelArgs:
    return ModelArgs(**{k: v for k, v in params.items() if k != "vocab_size"})


@pytest.fixture(scope="module")
def states(tiny_vocab):
    """The very weights of conftest's tiny_checkpoints: {kv: (params, state dict)}."""
    out = {}
    for kv in KV:
        params = {**tiny_params(-1, n_kv_heads=kv), "vocab_size": tiny_vocab}
        out[kv] = (params, random_state_dict(params, seed=0))
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, states):
    root = tmp_path_factory.mktemp("hf")
    return {kv: save_hf(sd, params, root / f"kv{kv}") for kv, (params, sd) in states.items()}


def _assert_reads_back(reader, sd):
    assert sorted(reader.keys()) == sorted(sd)
    for key, tensor in sd.items():
        assert reader.shape(key) == tuple(tensor.shape), key
        got = reader.read(key, None, 0, 0)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), key


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kv", KV)
def test_save_then_read_is_bit_exact(hf_dirs, states, kv):
    params, sd = states[kv]
    d = hf_dirs[kv]
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["intermediate_size"] == sd["layers.0.feed_forward.w1.weight"].shape[0]
    assert config["num_key_value_heads"] == (kv or params["n_heads"])
    assert (config["torch_dtype"], config["tie_word_embeddings"], config["bos_token_id"], config["eos_token_id"]) == ("float32", False, 1, 2)

    reader = HFCheckpoint(d)
    _assert_reads_back(reader, sd)
    got = reader.params
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "norm_eps"):
        assert got[key] == params[key], key
    assert got["n_kv_heads"] == (kv or params["n_heads"]) and got["rope_theta"] == 10000.0
    assert _args(got).ffn_hidden_dim == _args(params).ffn_hidden_dim


def test_stored_rows_are_in_hf_order(hf_dirs, states):
    """wq/wk are written in Hugging Face's per-head order: hf[i] = meta[2i], hf[i + hd/2] = meta[2i + 1]; the rest as is."""
    params, sd = states[2]
    stored = load_file(str(hf_dirs[2] / "model.safetensors"))
    hd = params["dim"] // params["n_heads"]
    for key in ("layers.1.attention.wq.weight", "layers.1.attention.wk.weight"):
        meta, hf = sd[key], stored[meta_to_hf_name(key)]
        for h in range(meta.shape[0] // hd):
            for i in range(hd // 2):
                assert torch.equal(hf[h * hd + i], meta[h * hd + 2 * i])
                assert torch.equal(hf[h * hd + i + hd // 2], meta[h * hd + 2 * i + 1])
    assert torch.equal(stored["model.layers.1.self_attn.v_proj.weight"], sd["layers.1.attention.wv.weight"])
    assert torch.equal(stored["model.layers.0.mlp.gate_proj.weight"], sd["layers.0.feed_forward.w1.weight"])
    assert torch.equal(stored["model.layers.0.mlp.up_proj.weight"], sd["layers.0.feed_forward.w3.weight"])
    assert torch.equal(stored["lm_head.weight"], sd["output.weight"])


def test_bfloat16_round_trip(tmp_path, states):
    params, sd = states[2]
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    d = save_hf(sd, {**params, "vocab_size": -1}, tmp_path / "bf16")
    assert json.loads((d / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reader = HFCheckpoint(d)
    assert reader.params["vocab_size"] == params["vocab_size"]
    _assert_reads_back(reader, sd)


@pytest.mark.parametrize("kv", KV)
@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_equal_meta_readers(hf_dirs, tiny_checkpoints, states, kv, world):
    params, _ = states[kv]
    args = _args(params)
    meta, hf = MetaCheckpoint(tiny_checkpoints[(kv, 2)]), HFCheckpoint(hf_dirs[kv])
    for rank in range(world):
        want = rank_slices(meta, args.kv_heads, args.head_dim, rank, world)
        got = rank_slices(hf, args.kv_heads, args.head_dim, rank, world)
        assert sorted(got) == sorted(want)
        for key in want:
            assert torch.equal(got[key], want[key]), (key, rank, world)


def test_reads_off_head_boundaries_and_along_dim_1(hf_dirs, states):
    _, sd = states[2]
    reader = HFCheckpoint(hf_dirs[2])
    for key in ("layers.0.attention.wq.weight", "layers.1.attention.wk.weight", "layers.0.attention.wv.weight"):
        rows, cols = sd[key].shape
        for dim, (start, stop) in [(0, (3, 29)), (0, (16, 17)), (0, (0, rows)), (1, (5, 40)), (1, (0, cols))]:
            assert torch.equal(reader.read(key, dim, start, stop), sd[key].narrow(dim, start, stop - start)), (key, dim, start)


def test_sharded_safetensors(tmp_path, states):
    params, sd = states[None]
    d = save_hf(sd, params, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (d / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())
    assert sorted(index["weight_map"]) == sorted(meta_to_hf_name(k) for k in sd)
    _assert_reads_back(HFCheckpoint(d), sd)
    # Writing again, unsharded, into the same directory replaces the shards and their index.
    save_hf(sd, params, d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    _assert_reads_back(HFCheckpoint(d), sd)


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_files(tmp_path, hf_dirs, states, sharded):
    """pytorch_model.bin, or shards with pytorch_model.bin.index.json; rotary inv_freq buffers are skipped."""
    _, sd = states[2]
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(hf_dirs[2] / "config.json", d)
    hf = load_file(str(hf_dirs[2] / "model.safetensors"))
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    if sharded:
        names = sorted(hf)
        parts = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for file, keys in parts.items():
            torch.save({k: hf[k] for k in keys}, d / file)
        weight_map = {k: file for file, keys in parts.items() for k in keys}
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(hf, d / "pytorch_model.bin")
    reader = HFCheckpoint(d)
    assert reader.format == "bin"
    _assert_reads_back(reader, sd)
    params = reader.params
    args = _args(params)
    for rank in range(4):
        want = rank_slices(HFCheckpoint(hf_dirs[2]), args.kv_heads, args.head_dim, rank, 4)
        got = rank_slices(reader, args.kv_heads, args.head_dim, rank, 4)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_tied_embeddings_and_unknown_names(tmp_path, hf_dirs, states):
    _, sd = states[2]
    d = tmp_path / "tied"
    d.mkdir()
    config = json.loads((hf_dirs[2] / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    from safetensors.torch import save_file

    hf = load_file(str(hf_dirs[2] / "model.safetensors"))
    del hf["lm_head.weight"]
    hf["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(hf, str(d / "model.safetensors"))
    reader = HFCheckpoint(d)
    assert torch.equal(reader.read("output.weight", None, 0, 0), sd["tok_embeddings.weight"])
    assert "model.layers.0.self_attn.q_proj.bias" in reader.keys()  # left for the loader to report


# --- the permutation against Hugging Face's rotary embedding -------------------------------------


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_permutation_turns_rotate_half_into_interleaved_rotary(hf_dirs, states, theta):
    """HF's rotary (rotate half, cos/sin repeated over the halves) on the HF-layout weights equals,
    up to the same per-head row order, Meta's interleaved rotary on the Meta-layout weights; so the
    attention scores q.k are the same."""
    params, sd = states[2]
    hd = params["dim"] // params["n_heads"]
    stored = load_file(str(hf_dirs[2] / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    seqlen = 7
    x = torch.randn(seqlen, params["dim"], generator=g, dtype=torch.float64)
    positions = torch.arange(seqlen, dtype=torch.float64)
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(positions, inv_freq)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    # Per head: HF row i <- Meta row 2i, HF row i + hd/2 <- Meta row 2i + 1.
    to_hf = [2 * i for i in range(hd // 2)] + [2 * i + 1 for i in range(hd // 2)]
    scores = {}
    for name in ("wq", "wk"):
        key = f"layers.0.attention.{name}.weight"
        w_meta, w_hf = sd[key].double(), stored[meta_to_hf_name(key)].double()
        heads = w_meta.shape[0] // hd
        q_hf = (x @ w_hf.T).view(seqlen, heads, hd)
        rot_hf = q_hf * cos + _rotate_half(q_hf) * sin
        q_meta = (x @ w_meta.T).view(1, seqlen, heads, hd)
        rot_meta = apply_rope(q_meta, rope_table(hd, seqlen, theta).double())[0]
        # apply_rope computes in float32; a wrong row order would be off by O(1).
        torch.testing.assert_close(rot_hf, rot_meta[..., to_hf], rtol=1e-5, atol=1e-5)
        scores[name] = (rot_hf, rot_meta)
    group = params["n_heads"] // params["n_kv_heads"]
    for which in (0, 1):
        q, k = scores["wq"][which], scores["wk"][which].repeat_interleave(group, dim=1)
        scores[which] = torch.einsum("shd,thd->hst", q, k)
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)


# --- loading whole models ------------------------------------------------------------------------


def _tokens():
    return torch.tensor([[1, 5, 17, 33, 8, 60, 2, 41, 12], [1, 70, 3, 3, 90, 11, 24, 50, 7]])


@pytest.mark.parametrize("kv", KV)
def test_build_from_hf_dir_equals_meta(hf_dirs, tiny_checkpoints, tiny_tokenizer_path, kv):
    reader, params = open_checkpoint(hf_dirs[kv])
    assert isinstance(reader, HFCheckpoint) and params is reader.params
    models = [
        Llama.build(str(d), str(tiny_tokenizer_path), MAX_SEQ_LEN, 2, device="cpu", dtype=torch.float32)
        for d in (tiny_checkpoints[(kv, 1)], hf_dirs[kv])
    ]
    tokens = _tokens()
    meta_logits, hf_logits = (m.model.forward(tokens, 0) for m in models)
    assert torch.equal(meta_logits, hf_logits)
    prompts = [[1, 5, 17, 33], [1, 70, 3]]
    meta_out, hf_out = (m.generate(prompts, max_gen_len=12, temperature=0.0)[0] for m in models)
    assert meta_out == hf_out and all(len(t) > 0 for t in hf_out)


def test_open_checkpoint_prefers_meta_files(tmp_path, hf_dirs, tiny_checkpoints):
    d = tmp_path / "both"
    shutil.copytree(tiny_checkpoints[(2, 1)], d)
    shutil.copy(hf_dirs[2] / "config.json", d)
    assert isinstance(open_checkpoint(d)[0], MetaCheckpoint)
    # A params.json beside Hugging Face weights (no Meta shards) leaves the directory Hugging Face's.
    h = tmp_path / "hf-with-params"
    shutil.copytree(hf_dirs[2], h)
    shutil.copy(tiny_checkpoints[(2, 1)] / "params.json", h)
    assert isinstance(open_checkpoint(h)[0], HFCheckpoint)


def test_resolve_tokenizer_path(tmp_path, tiny_tokenizer_path):
    assert resolve_tokenizer_path(tiny_tokenizer_path) == str(tiny_tokenizer_path)
    d = tmp_path / "model"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        resolve_tokenizer_path(d)
    shutil.copy(tiny_tokenizer_path, d / "tokenizer.model")
    assert resolve_tokenizer_path(d) == str(d / "tokenizer.model")
    assert resolve_tokenizer_path(str(d)) == str(d / "tokenizer.model")


@pytest.mark.parametrize(
    "dim, intermediate, meta_ffn",
    [(4096, 11008, (256, None)), (5120, 13824, (256, None)), (8192, 28672, (4096, 1.3)),
     (64, 192, None), (64, 100, None), (64, 171, None), (64, 1000, None), (64, 1, None)],
)
def test_params_match_any_intermediate_size(dim, intermediate, meta_ffn):
    config = {"model_type": "llama", "hidden_size": dim, "num_hidden_layers": 1, "num_attention_heads": dim // 64 or 1,
              "intermediate_size": intermediate, "vocab_size": 32000}
    params = params_from_config(config)
    assert _args(params).ffn_hidden_dim == intermediate
    if meta_ffn:  # Llama 2 7B, 13B and 70B get Meta's own params.json values
        assert (params["multiple_of"], params["ffn_dim_multiplier"]) == meta_ffn
    assert params["n_kv_heads"] == params["n_heads"] and params["rope_theta"] == 10000.0 and params["norm_eps"] == 1e-6


# --- against transformers ------------------------------------------------------------------------


@pytest.mark.parametrize("kv, theta", [(None, 10000.0), (2, 10000.0), (2, 1e6)])
def test_logits_equal_transformers(tmp_path, states, tiny_tokenizer_path, kv, theta):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf-test]')")
    params, sd = states[kv]
    d = save_hf(sd, {**params, "rope_theta": theta}, tmp_path / "hf")
    try:
        ref = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32, attn_implementation="eager")
    except TypeError:  # transformers 4 spells it torch_dtype
        ref = transformers.LlamaForCausalLM.from_pretrained(str(d), torch_dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    ours = Llama.build(str(d), str(tiny_tokenizer_path), MAX_SEQ_LEN, 2, device="cpu", dtype=torch.float32)
    assert ours.model.params.rope_theta == theta
    tokens = _tokens()
    with torch.no_grad():
        want = ref(tokens).logits.float()
    got = ours.model.forward(tokens, 0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


# --- errors --------------------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, **changes):
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    for key, value in changes.items():
        if value is ...:
            del config[key]
    (d / "config.json").write_text(json.dumps(config))


@pytest.fixture
def sharded_dir(tmp_path, states):
    params, sd = states[2]
    return save_hf(sd, params, tmp_path / "sharded", max_shard_bytes=40_000)


def _shard_files(d):
    return sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_missing_index_listed_file(sharded_dir):
    gone = _shard_files(sharded_dir)[1]
    (sharded_dir / gone).unlink()
    with pytest.raises(CheckpointError, match=re.escape(gone) + ".* is missing"):
        HFCheckpoint(sharded_dir)


def test_tensor_missing_from_its_file(sharded_dir):
    path = sharded_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = _shard_files(sharded_dir)[0]
    index["weight_map"]["model.norm.weight"] = first
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(first) + r".* does not hold tensor 'model\.norm\.weight'"):
        HFCheckpoint(sharded_dir)


@pytest.mark.parametrize("cut", [0.5, 8, 0])
def test_corrupt_safetensors(tmp_path, hf_dirs, cut):
    d = _copy(hf_dirs[2], tmp_path / "corrupt")
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)] if cut < 1 else data[:cut])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        HFCheckpoint(d)


def test_corrupt_bin(tmp_path, hf_dirs):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(hf_dirs[2] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin"):
        HFCheckpoint(d)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "mistral"}, r"model_type='mistral'"),
        ({"model_type": ...}, r"model_type=None"),
        ({"hidden_size": ...}, r"missing keys \['hidden_size'\]"),
        ({"intermediate_size": ..., "vocab_size": ...}, r"missing keys \['intermediate_size', 'vocab_size'\]"),
        ({"num_attention_heads": 0}, r"num_attention_heads=0"),
        ({"rms_norm_eps": "small"}, r"rms_norm_eps='small'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_scaling=.*linear.* not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, r"rope_parameters=.*llama3"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads=3"),
        ({"head_dim": 32}, r"head_dim=32"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
        ({"attention_bias": True}, r"attention_bias"),
        ({"sliding_window": 4096}, r"sliding_window=4096 is not supported"),
        ({"rope_theta": 1e-300}, r"rope_theta=1e-300 must be a finite number"),
    ],
)
def test_bad_config(tmp_path, hf_dirs, changes, message):
    d = _copy(hf_dirs[2], tmp_path / "bad")
    _edit_config(d, **changes)
    with pytest.raises(CheckpointError, match=message) as e:
        HFCheckpoint(d)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("changes, message", [({"num_hidden_layers": 1_000_000}, "has 1000000 layers, the checkpoint 2"),
                                             ({"hidden_size": 4096, "num_attention_heads": 64, "head_dim": 64},
                                              "has dim 4096, the checkpoint 64")])
def test_config_not_matching_the_tensors(tmp_path, hf_dirs, changes, message):
    """Compared before a model is built: it would have a million layers."""
    d = _copy(hf_dirs[2], tmp_path / "other")
    _edit_config(d, **changes)
    with pytest.raises(CheckpointError, match=f"config.json' {message}"):
        open_checkpoint(d)


def test_rope_parameters_of_transformers_5(tmp_path, hf_dirs):
    """transformers 5 writes rope_theta inside rope_parameters."""
    d = _copy(hf_dirs[2], tmp_path / "v5")
    _edit_config(d, rope_theta=..., rope_scaling=..., rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert HFCheckpoint(d).params["rope_theta"] == 1e6


def test_no_weights(tmp_path, hf_dirs):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(hf_dirs[2] / "config.json", d)
    with pytest.raises(CheckpointError, match="no weights"):
        HFCheckpoint(d)


def test_unexpected_tensor_reaches_the_loader(tmp_path, hf_dirs, tiny_tokenizer_path):
    from safetensors.torch import save_file

    d = _copy(hf_dirs[2], tmp_path / "extra")
    hf = load_file(str(d / "model.safetensors"))
    hf["model.layers.0.mlp.gate_proj.bias"] = torch.zeros(192)
    save_file(hf, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected \['model\.layers\.0\.mlp\.gate_proj\.bias'\]"):
        Llama.build(str(d), str(tiny_tokenizer_path), MAX_SEQ_LEN, 2, device="cpu")


def test_save_refuses_unknown_names(tmp_path, states):
    params, sd = states[2]
    with pytest.raises(ValueError, match="extra.weight"):
        save_hf({**sd, "extra.weight": torch.zeros(1)}, params, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_build_takes_the_hf_directory_as_tokenizer_path(tmp_path, hf_dirs, tiny_tokenizer_path):
    d = shutil.copytree(hf_dirs[2], tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Llama.build(str(d), str(d), MAX_SEQ_LEN, 1, device="cpu")
    shutil.copy(tiny_tokenizer_path, d / "tokenizer.model")
    assert Llama.build(str(d), str(d), MAX_SEQ_LEN, 1, device="cpu").tokenizer.n_words > 0
