"""The on-disk cache of compiled decode steps: its key, a damaged package, a cache that cannot be written,
its size bound, and no temporary files left behind."""

import logging
import os
import tempfile
import time

import pytest

import torch

from llama import Llama
from llama.compile_cache import cache_dir, evict, package_key
from llama.random_model import build_random_model


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_COMPILE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    for off in ("off", "0", ""):
        monkeypatch.setenv("LLAMA_COMPILE_CACHE", off)
        assert cache_dir() is None
    monkeypatch.delenv("LLAMA_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "llama" / "compiled"


def test_key_changes_with_any_weight_and_setting():
    model = build_random_model("tiny", torch.device("cpu"), torch.float32, 32, 2)
    settings = {"cache": (2, 32)}
    key = package_key(model, settings)
    assert package_key(build_random_model("tiny", torch.device("cpu"), torch.float32, 32, 2), settings) == key
    assert package_key(model, {"cache": (3, 32)}) != key
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[7, 3] += 1e-3  # one element of one matrix: a fine-tune of the same shape
    assert package_key(model, settings) != key
    assert package_key(model.to(torch.bfloat16), settings) != package_key(model.float(), settings)


def _greedy(generator):
    return generator.generate([[1, 10, 11, 12], [1, 20]], max_gen_len=6, temperature=0)[0]


def test_a_damaged_package_is_compiled_again(tiny_checkpoints, tiny_tokenizer_path, monkeypatch, tmp_path, caplog):
    """Also: compiling and loading leave nothing in the temporary directory (torch leaves GBs there by itself)."""
    monkeypatch.setenv("LLAMA_COMPILE_CACHE", str(tmp_path))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def build(compile):
        return Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 32, 2, device="cpu", compile=compile)

    expected = _greedy(build(False))
    first = build(True)
    assert first.decode_step.routes == ""  # nothing has run yet
    assert _greedy(first) == expected
    assert first.decode_step.routes == "ahead of time, compiled into the compile cache"
    second = build(True)
    assert _greedy(second) == expected and second.decode_step.routes == "ahead of time, loaded from the compile cache"
    (package,) = tmp_path.glob("decode-*.pt2")
    package.write_bytes(package.read_bytes()[:1000])  # truncated, as by a full disk or a copy cut short
    with caplog.at_level(logging.WARNING, logger="llama.compile_cache"):
        third = build(True)
        assert _greedy(third) == expected
    assert "could not load the compiled decode step" in caplog.text
    assert third.decode_step.routes == "ahead of time, compiled into the compile cache"
    assert package.stat().st_size > 1000 and not list(tmp_path.glob(".*"))  # replaced whole; no temporary left
    # Only inductor's precompiled headers stay: one set per torch build, reused by every compilation.
    assert not [p for p in scratch.rglob("*") if p.is_file() and "precompiled_headers" not in p.parts]


def test_the_least_recently_used_packages_go_beyond_the_size_limit(monkeypatch, tmp_path):
    now = time.time()
    for age, name in enumerate(("new", "mid", "old", "older")):
        (tmp_path / f"decode-{name}.pt2").write_bytes(b"x" * 400)
        os.utime(tmp_path / f"decode-{name}.pt2", (now - age * 60, now - age * 60))
    (tmp_path / ".decode-dead.abc.pt2").write_bytes(b"x")  # a compilation that died two days ago
    os.utime(tmp_path / ".decode-dead.abc.pt2", (now - 2 * 86400, now - 2 * 86400))
    (tmp_path / ".decode-busy.abc.pt2").write_bytes(b"x")  # one compiling now
    monkeypatch.setenv("LLAMA_COMPILE_CACHE_GB", str(1000 / 1e9))
    evict(tmp_path, keep=tmp_path / "decode-older.pt2")  # just written: kept however old its time
    assert sorted(p.name for p in tmp_path.iterdir()) == [".decode-busy.abc.pt2", "decode-new.pt2", "decode-older.pt2"]
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("LLAMA_COMPILE_CACHE_GB", bad)
        with pytest.raises(ValueError, match="LLAMA_COMPILE_CACHE_GB must be a number of gigabytes"):
            evict(tmp_path)


def test_a_cache_that_cannot_be_written_compiles_in_process(tiny_checkpoints, tiny_tokenizer_path, monkeypatch, tmp_path, caplog):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    monkeypatch.setenv("LLAMA_COMPILE_CACHE", str(not_a_directory / "compiled"))
    generator = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 32, 2, device="cpu", compile=True)
    with caplog.at_level(logging.WARNING, logger="llama.compiled"):
        got = _greedy(generator)
    assert "compiling it in this process instead" in caplog.text
    # The fallback only warns; the step says which way it went, for a benchmark to print.
    assert generator.decode_step.routes.startswith("in this process (compiling ahead of time failed: ")
    assert got == _greedy(Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 32, 2, device="cpu"))


def test_the_route_says_when_the_cache_is_off(tiny_checkpoints, tiny_tokenizer_path, monkeypatch):
    monkeypatch.setenv("LLAMA_COMPILE_CACHE", "off")
    generator = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 32, 2, device="cpu", compile=True)
    _greedy(generator)
    assert generator.decode_step.routes == "in this process (LLAMA_COMPILE_CACHE is off)"
    assert Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 32, 2, device="cpu").decode_step is None
