import errno
import io
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.checkpoint import MetaCheckpoint, load_params, rank_slices
from llama.convert import reshard
from tests.conftest import REPO, check_exit, launch


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


def test_to_hf_and_reshard_show_one_progress_bar(tmp_path, tiny_checkpoints, monkeypatch):
    from llama.convert import to_hf

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    src = tiny_checkpoints[(2, 2)]
    tensors_per_rank = 2 * 9 + 3  # 9 per layer, the embedding, the final norm and the output
    for convert, total in ((lambda out: to_hf(str(src), str(out)), tensors_per_rank),
                           (lambda out: reshard(str(src), str(out), shards=2), 2 * tensors_per_rank)):
        err = Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        convert(tmp_path / f"out{total}")
        assert "Converting" in err.getvalue() and f"{total}/{total}" in err.getvalue()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
@pytest.mark.parametrize("command", ["reshard", "to_hf"])
def test_the_output_has_the_permissions_of_the_umask(tmp_path, tiny_checkpoints, umask, command):
    """The staging directory came from mkdtemp: drwx------, which other users could not read."""
    from llama.convert import to_hf

    src = Path(shutil.copytree(tiny_checkpoints[(None, 1)], tmp_path / "src"))
    (src / "tokenizer.model").write_bytes(b"a tokenizer")
    (src / "tokenizer.model").chmod(0o600)  # as a download may leave it: the copy must not keep that
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        reshard(str(src), str(out), shards=1) if command == "reshard" else to_hf(str(src), str(out))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = list(out.iterdir())
    assert len(files) == 3 and {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o666 & ~umask}


def _full_disk(monkeypatch, command):
    """Make the weights' writer fail as it does on a full disk, after writing part of its file."""
    if command == "reshard":
        def save(obj, f, *args, **kwargs):
            Path(f).write_bytes(b"PK partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

        monkeypatch.setattr(torch, "save", save)
    else:
        from safetensors import SafetensorError

        def save_file(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr("safetensors.torch.save_file", save_file)


@pytest.mark.parametrize("command", ["reshard", "to_hf"])
def test_a_full_disk_is_said_in_words_and_leaves_nothing(tmp_path, tiny_checkpoints, monkeypatch, command):
    from llama.convert import to_hf

    _full_disk(monkeypatch, command)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=f"the disk is full: writing '{out / 'x'}' failed with [\\d.]+ GB free on its "
                                      f"disk; free some space or write to another directory") as raised:
        src = str(tiny_checkpoints[(None, 2)])
        reshard(src, str(out / "x"), shards=1) if command == "reshard" else to_hf(src, str(out / "x"))
    assert raised.value.errno == errno.ENOSPC
    assert list(out.iterdir()) == []


def test_a_signal_handler_of_the_caller_runs_after_the_cleanup(tmp_path, tiny_checkpoints, monkeypatch):
    """A SIGTERM mid-conversion removes the partial output, then reaches the handler the program had."""
    received = []

    def handler(signum, frame):
        received.append(signum)

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(torch, "save", save)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(InterruptedError, match="interrupted by SIGTERM; nothing was written"):
            reshard(str(tiny_checkpoints[(None, 2)]), str(tmp_path / "out" / "x"), shards=2)
        assert received == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list((tmp_path / "out").iterdir()) == []


SLOW_CONVERT = """
import signal, sys, time, torch
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a test run under nohup would pass on SIGHUP ignored (convert leaves it so)
real_save = torch.save
def save(obj, f, *args, **kwargs):  # the first shard written, then the conversion waits for the signal
    real_save(obj, f, *args, **kwargs)
    print("saved", flush=True)
    time.sleep(120)
torch.save = save
from llama.convert import main
sys.argv[0] = "llama.convert"
main()
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, getattr(signal, "SIGHUP", 0)], ids=["SIGTERM", "SIGHUP"])
def test_convert_killed_by_a_signal_leaves_nothing(tmp_path, tiny_checkpoints, signum):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "reshard", str(tiny_checkpoints[(None, 2)]),
                             str(out / "x"), "--shards", "2"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "saved\n", proc.stderr.read()
        assert len(list(out.iterdir())) == 1  # the staging directory, with the first shard
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signum  # ended by the signal, as without the handlers
    assert list(out.iterdir()) == []


def test_stale_staging_directories_of_dead_processes_are_removed(tmp_path, tiny_checkpoints, caplog):
    """What SIGKILL or a power cut leaves behind goes with the next conversion to the same name; nothing else does."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, out = socket.gethostname(), tmp_path / "out"
    stale = out / f".mp1.{dead.pid}@{host}.0123abcd"
    stale.mkdir(parents=True)
    (stale / "consolidated.00.pth").write_bytes(b"partial")
    kept = [out / f".mp1.{os.getpid()}@{host}.0123abcd",  # a live process: perhaps converting right now
            out / f".mp1.{dead.pid}@elsewhere-{host}.0123abcd",  # another host's process: cannot be checked
            out / f".mp2.{dead.pid}@{host}.0123abcd"]  # another output's
    for path in kept:
        path.mkdir()
    with caplog.at_level(logging.WARNING, logger="llama.convert"):
        reshard(str(tiny_checkpoints[(None, 1)]), str(out / "mp1"), shards=1)
    assert not stale.exists() and all(path.exists() for path in kept)
    assert f"removed {stale}" in caplog.text and f"(process {dead.pid})" in caplog.text
    assert (out / "mp1" / "consolidated.00.pth").is_file()
