"""The bundled demo model: the examples and the server run it when given no weights, also from an installed wheel."""

import hashlib
import subprocess
import sys
import zipfile

import pytest

from llama import demo_model_dir
from tests.conftest import REPO, check_exit, launch

STORY = ", there was a little girl named Lily"
NOTICE = "Running the bundled demo model"


def test_the_bundled_files_are_the_documented_ones():
    listed = (demo_model_dir() / "README.md").read_text()
    for name in ("consolidated.00.pth", "params.json", "tokenizer.model"):
        md5 = hashlib.md5((demo_model_dir() / name).read_bytes()).hexdigest()
        assert f"{name} {md5}" in listed


def test_text_example_without_weight_flags_prints_stories():
    proc = launch(["example_text_completion.py", "--device", "cpu", "--temperature", "0"])
    check_exit(proc)
    assert f"Once upon a time\n> {STORY}" in proc.stdout
    assert proc.stderr.count(NOTICE) == 1 and "--ckpt_dir and --tokenizer_path" in proc.stderr


def test_interactive_chat_on_the_demo_model():
    proc = launch(["example_chat_completion.py", "--interactive", "--temperature", "0", "--max_gen_len", "20"],
                  input="Tell me a story\n")
    check_exit(proc)
    assert proc.stdout.startswith("Assistant: ") and len(proc.stdout) > 20 and NOTICE in proc.stderr


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py", "-m llama.server"])
@pytest.mark.parametrize("given", ["--ckpt_dir", "--tokenizer_path"])
def test_one_weight_flag_without_the_other_is_refused(script, given):
    proc = launch(script.split() + [given, "somewhere"])
    assert proc.returncode != 0
    assert "was given without" in proc.stderr and "neither for the bundled demo model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_server_on_the_demo_model_stops_a_story_at_bos():
    from tests.test_server import Server

    server = Server(None, None, max_seq_len=512)
    try:
        out = server.client().completions.create(model="stories260K", prompt="Once upon a time", max_tokens=400, temperature=0)
        assert out.choices[0].text.startswith(STORY) and out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens == 341  # the story ends with BOS there (see the model's README)
    finally:
        assert server.stop() == 0


def test_a_built_wheel_carries_the_model_and_runs_it(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("llama-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("consolidated.00.pth", "params.json", "tokenizer.model", "README.md"):
        assert f"llama/demo/stories260K/{name}" in names
    assert "llama/static/chat.html" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = (
        "import llama, sys; from llama import Llama, demo_model_dir\n"
        "assert llama.__file__.startswith(sys.argv[1]), llama.__file__\n"
        "g = Llama.build(demo_model_dir(), demo_model_dir() / 'tokenizer.model', 128, 1, device='cpu')\n"
        "print(g.text_completion(['Once upon a time'], temperature=0, max_gen_len=12)[0]['generation'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={"PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    check_exit(proc)
    assert proc.stdout.startswith(STORY)
