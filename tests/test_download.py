"""End-to-end tests for download.sh against a local HTTP server.

The server serves a temporary directory laid out like the presigned-URL tree
(LICENSE, tokenizer files, llama-2-*/consolidated.NN.pth, ...). Each test
builds its own tree under a sub-folder of the served root, so one server
covers the good, corrupted and missing-file cases; the presigned URL is then
``http://127.0.0.1:PORT/<tree>/*?Policy=abc&Signature=xyz``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "download.sh"

BASH = shutil.which("bash")
WGET = shutil.which("wget")

pytestmark = pytest.mark.skipif(
    BASH is None or WGET is None,
    reason="download.sh needs bash and wget on PATH",
)

# Stock `python -m http.server` ignores Range headers (it always answers 200
# with the whole file), so a resume test against it could not tell resuming
# from re-downloading. This is the same SimpleHTTPRequestHandler plus minimal
# "Range: bytes=N-" support, which is what `wget --continue` sends. It binds
# port 0 and prints the port it got, so there is no free-port race.
SERVER_CODE = r"""
import functools, http.server, os, re, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    def send_head(self):
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        path = self.translate_path(self.path)  # drops the ?query part
        if match is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start = int(match.group(1))
        if start >= size:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f

handler = functools.partial(Handler, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

SHARD_SIZE = 256 * 1024

# folder -> number of shards, for the models the fake server offers
FAKE_MODELS = {"llama-2-7b": 1, "llama-2-13b": 2}


class Server:
    def __init__(self, root: Path, port: int, log: Path):
        self.root = root
        self.port = port
        self.log = log

    def url(self, tree: str) -> str:
        return f"http://127.0.0.1:{self.port}/{tree}/*?Policy=abc&Signature=xyz"

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    log = tmp_path_factory.mktemp("serverlog") / "access.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_CODE, str(root)],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    try:
        port = int(proc.stdout.readline())
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"test HTTP server did not start: {log.read_text()}")
                time.sleep(0.05)
        yield Server(root, port, log)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def make_tree(server: Server, name: str) -> dict[str, bytes]:
    """Write a fake presigned-URL tree under the served root.

    Returns {path relative to the tree: bytes} for every file in it.
    """
    files: dict[str, bytes] = {
        "LICENSE": b"Fake Llama 2 license, for tests.\n",
        "USE_POLICY.md": b"# Fake acceptable use policy\n",
        "tokenizer.model": os.urandom(4096),
    }
    files["tokenizer_checklist.chk"] = (
        f"{_md5(files['tokenizer.model'])}  tokenizer.model\n".encode()
    )
    for folder, shards in FAKE_MODELS.items():
        names = [f"consolidated.{i:02d}.pth" for i in range(shards)]
        for shard in names:
            files[f"{folder}/{shard}"] = os.urandom(SHARD_SIZE)
        files[f"{folder}/params.json"] = b'{"dim": 64, "n_layers": 2, "n_heads": 4}\n'
        names.append("params.json")
        files[f"{folder}/checklist.chk"] = "".join(
            f"{_md5(files[f'{folder}/{n}'])}  {n}\n" for n in names
        ).encode()

    tree = server.root / name
    for rel, data in files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.pop("TARGET_FOLDER", None)
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def run_download(url: str, models: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    # The script's own output and wget's progress go to one stream, so tests
    # can look for messages without caring which stream they went to.
    return subprocess.run(
        [BASH, str(SCRIPT)],
        input=f"{url}\n{models}\n",
        cwd=cwd,
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
    )


def downloaded_files(target: Path) -> set[str]:
    return {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}


def expected_subset(files: dict[str, bytes], folders: list[str]) -> dict[str, bytes]:
    return {rel: data for rel, data in files.items() if "/" not in rel or rel.split("/")[0] in folders}


@pytest.mark.parametrize("via", ["cwd", "TARGET_FOLDER"])
def test_downloads_requested_models(server, tmp_path, via):
    files = make_tree(server, f"good-{via}")
    if via == "cwd":
        target = tmp_path
        result = run_download(server.url(f"good-{via}"), "7B,13B", cwd=tmp_path)
    else:
        target = tmp_path / "weights"
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        result = run_download(
            server.url(f"good-{via}"), "7B,13B", cwd=elsewhere, TARGET_FOLDER=str(target)
        )
        assert not any(elsewhere.iterdir())

    assert result.returncode == 0, result.stdout
    expected = expected_subset(files, ["llama-2-7b", "llama-2-13b"])
    assert downloaded_files(target) == set(expected)
    for rel, data in expected.items():
        assert (target / rel).read_bytes() == data, rel


def test_checksum_mismatch_fails(server, tmp_path):
    make_tree(server, "corrupt")
    # Same size, different bytes than the checklist expects.
    (server.root / "corrupt/llama-2-7b/consolidated.00.pth").write_bytes(os.urandom(SHARD_SIZE))

    result = run_download(server.url("corrupt"), "7B", cwd=tmp_path)

    assert result.returncode != 0
    assert "consolidated.00.pth: FAILED" in result.stdout
    assert "checksum mismatch in llama-2-7b" in result.stdout


def test_resumes_partial_download(server, tmp_path):
    files = make_tree(server, "resume")
    rel = "llama-2-13b/consolidated.01.pth"
    partial = tmp_path / rel
    partial.parent.mkdir(parents=True)
    partial.write_bytes(files[rel][: SHARD_SIZE // 2])

    result = run_download(server.url("resume"), "13B", cwd=tmp_path)

    assert result.returncode == 0, result.stdout
    assert partial.read_bytes() == files[rel]
    assert "consolidated.01.pth: OK" in result.stdout
    # Only the missing half came over the wire: the server answered 206.
    hits = [line for line in server.requests() if f"/resume/{rel}" in line]
    assert hits and all('" 206 ' in line for line in hits), hits


def test_unknown_model_downloads_nothing(server, tmp_path):
    make_tree(server, "unknown")
    before = len(server.requests())

    result = run_download(server.url("unknown"), "7B,13b-instruct", cwd=tmp_path)

    assert result.returncode != 0
    assert "13b-instruct" in result.stdout
    assert "7B,13B,70B,7B-chat,13B-chat,70B-chat" in result.stdout
    assert not any(tmp_path.iterdir())
    assert len(server.requests()) == before


def test_missing_file_on_server_fails(server, tmp_path):
    make_tree(server, "missing")
    (server.root / "missing/llama-2-7b/params.json").unlink()

    result = run_download(server.url("missing"), "7B", cwd=tmp_path)

    assert result.returncode != 0
    assert "404" in result.stdout
    assert "llama-2-7b/params.json" in result.stdout
    # wget -O leaves an empty file on errors; the script must not keep it.
    assert not (tmp_path / "llama-2-7b/params.json").exists()
    assert not (tmp_path / "llama-2-7b/checklist.chk").exists()


def test_empty_url_fails(tmp_path):
    result = run_download("", "7B", cwd=tmp_path)

    assert result.returncode != 0
    assert "URL" in result.stdout
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(shutil.which("md5sum") is None, reason="needs md5sum to fake macOS md5")
@pytest.mark.parametrize("corrupt", [False, True], ids=["ok", "corrupt"])
def test_macos_md5_fallback(server, tmp_path, corrupt):
    """Without md5sum on PATH the script verifies with `md5 -r`, as on macOS."""
    tree = f"md5-{'corrupt' if corrupt else 'ok'}"
    files = make_tree(server, tree)
    if corrupt:
        (server.root / tree / "llama-2-7b/params.json").write_bytes(b"{}\n")

    # A PATH with everything the current one has except md5sum, plus a
    # stand-in for macOS's `md5 -r FILE` ("<md5> FILE", one space).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real_md5sum = shutil.which("md5sum")
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry or not os.path.isdir(entry):
            continue
        for name in os.listdir(entry):
            src = os.path.join(entry, name)
            link = bin_dir / name
            if name in ("md5sum", "md5") or link.exists() or not os.access(src, os.X_OK):
                continue
            link.symlink_to(src)
    fake_md5 = bin_dir / "md5"
    fake_md5.write_text(
        "#!/bin/sh\n"
        '[ "$1" = "-r" ] || exit 2\n'
        f'sum=$("{real_md5sum}" "$2" | cut -d" " -f1) || exit 1\n'
        'echo "$sum $2"\n'
    )
    fake_md5.chmod(0o755)

    target = tmp_path / "target"
    target.mkdir()
    result = run_download(server.url(tree), "7B", cwd=target, PATH=str(bin_dir))

    if corrupt:
        assert result.returncode != 0
        assert "params.json: FAILED" in result.stdout
        assert "checksum mismatch in llama-2-7b" in result.stdout
    else:
        assert result.returncode == 0, result.stdout
        assert "consolidated.00.pth: OK" in result.stdout
        expected = expected_subset(files, ["llama-2-7b"])
        assert downloaded_files(target) == set(expected)
        for rel, data in expected.items():
            assert (target / rel).read_bytes() == data, rel
