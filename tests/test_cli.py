"""llama/cli.py: every command line reports a user error in a line or two (no traceback), exits quietly on Ctrl-C,
keeps the traceback of a bug and, with LLAMA_DEBUG=1, of everything; every flag of every command has help text."""

import os
import re
import runpy
import signal
import subprocess
import sys
from typing import Optional

import pytest

from llama import cli
from tests.conftest import REPO, launch

# (how to run it, the arguments of a user error, what the message says)
MISSING = "/nonexistent/llama-2-7b"
USER_ERRORS = [
    (["example_text_completion.py"], ["--ckpt_dir", MISSING, "--tokenizer_path", MISSING], "does not exist"),
    (["example_chat_completion.py"], ["--ckpt_dir", MISSING, "--tokenizer_path", MISSING], "does not exist"),
    (["example_chat_completion.py"], ["--system", "hi"], "--system applies only with --interactive"),
    (["example_text_completion.py"], ["--temperature", "-1", "--max_gen_len", "2"], "temperature must be"),
    (["-m", "llama.server"], ["--ckpt_dir", MISSING, "--tokenizer_path", MISSING], "does not exist"),
    (["-m", "llama.convert"], ["reshard", MISSING, "/tmp/out", "1"], "does not exist"),
    (["-m", "llama.perplexity"], ["--text", MISSING], "is not a file"),
    (["-m", "llama.quality"], ["--text", MISSING], "is not a file"),
    (["-m", "llama.evaluate"], ["--tasks", ","], "--tasks needs at least one task name"),
    (["-m", "llama.bench"], ["--shape", "huge"], "shape='huge' is not one of"),
    (["-m", "llama.bench_serving"], ["--gen_min", "1"], "gen_min must be at least 2"),
    (["-m", "llama.bench_http"], ["--concurrency", "0"], "concurrency must be a positive integer"),
]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", cli.DEBUG_VARIABLE)}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.parametrize("command,args,says", USER_ERRORS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_a_user_error_is_one_line_without_a_traceback(command, args, says):
    proc = launch(command + args, timeout=120)
    assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], proc.stderr
    assert f"{cli.DEBUG_VARIABLE}=1" in proc.stderr


def test_llama_debug_shows_the_traceback():
    proc = subprocess.run([sys.executable, "example_text_completion.py", "--ckpt_dir", MISSING, "--tokenizer_path",
                           MISSING], cwd=REPO, env=_clean_env(**{cli.DEBUG_VARIABLE: "1"}), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_under_torchrun_the_error_is_printed_once():
    proc = launch(["example_text_completion.py", "--ckpt_dir", MISSING, "--tokenizer_path", MISSING], nproc=2,
                  timeout=120)
    assert proc.returncode != 0
    # The launcher adds its own report; the ranks' error shows once, without their tracebacks.
    assert proc.stderr.count("does not exist; pass --ckpt_dir") == 1, proc.stderr
    assert "llama/loading.py" not in proc.stderr


def test_ctrl_c_exits_quietly_with_130(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text("import time\nfrom llama.cli import run\n\n\ndef main():\n    print('ready', flush=True)\n"
                      "    time.sleep(60)\n\n\nrun(main)\n")
    proc = subprocess.Popen([sys.executable, script], env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == cli.EXIT_INTERRUPTED and err == ""


# ---- the wrapper in process


def _fails_with(error: BaseException):
    def main(x: int = 1) -> None:
        raise error

    return main


def test_user_errors_bugs_and_debug(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for error in (ValueError("bad value; use a good one"), FileNotFoundError("no such file; pass another"),
                  OSError(28, "No space left on device")):
        with pytest.raises(SystemExit) as exit_:
            cli.run(_fails_with(error), command=[])
        assert exit_.value.code == cli.EXIT_USER_ERROR
        assert capsys.readouterr().err == f"error: {error}\n(set {cli.DEBUG_VARIABLE}=1 for the full traceback)\n"
    with pytest.raises(SystemExit) as exit_:
        cli.run(_fails_with(KeyboardInterrupt()), command=[])
    assert exit_.value.code == cli.EXIT_INTERRUPTED and capsys.readouterr().err == ""
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.run(_fails_with(KeyError("x")), command=[])
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "1")
    with pytest.raises(ValueError):
        cli.run(_fails_with(ValueError("x")), command=[])
    with pytest.raises(KeyboardInterrupt):
        cli.run(_fails_with(KeyboardInterrupt()), command=[])


def test_another_rank_names_itself_when_it_outlives_the_grace(capsys, monkeypatch):
    """A rank other than 0 still running after the grace period met an error of its own: it says which rank."""
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "PEER_GRACE_S", 0.0)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            cli.run(_fails_with(ValueError("shard 1 is corrupt")), command=[])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err.startswith("rank 1: error: shard 1 is corrupt\n")


# ---- --help


ENTRY_POINTS = [("example_text_completion.py", []), ("example_chat_completion.py", []), ("llama.server", []),
                ("llama.bench", []), ("llama.bench_serving", []), ("llama.bench_http", []), ("llama.perplexity", []),
                ("llama.quality", []), ("llama.evaluate", []), ("llama.convert", ["reshard"]),
                ("llama.convert", ["to_hf"]), ("llama.convert", ["to_meta"])]


def _help(entry: str, args: list, capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", [entry] + args + ["--help"])
    monkeypatch.setenv("PAGER", "cat")
    with pytest.raises(SystemExit) as exit_:
        if entry.endswith(".py"):
            runpy.run_path(str(REPO / entry), run_name="__main__")
        else:
            runpy.run_module(entry, run_name="__main__", alter_sys=False)
    assert exit_.value.code == 0
    return capsys.readouterr().err  # fire writes its help to stderr


RUNPY_WARNING = "ignore:.*found in sys.modules after import of package:RuntimeWarning"  # a module already imported


@pytest.mark.filterwarnings(RUNPY_WARNING)
@pytest.mark.parametrize("entry,args", ENTRY_POINTS, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_help_shows_real_types(entry, args, capsys, monkeypatch):
    text = _help(entry, args, capsys, monkeypatch)
    assert "FLAGS" in text and "Optional[Optional]" not in text and "Type: Optional[str]" in text


@pytest.mark.filterwarnings(RUNPY_WARNING)
@pytest.mark.parametrize("entry,args", ENTRY_POINTS, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_every_flag_has_help_text(entry, args, capsys, monkeypatch):
    text = _help(entry, args, capsys, monkeypatch)
    blocks = re.findall(r"^    (?:-\w, )?--(\w+)=\w+\n((?:        .*\n?)*)", text, flags=re.M)
    assert blocks
    for flag, body in blocks:
        described = [line for line in body.splitlines() if not line.strip().startswith(("Type:", "Default:"))]
        assert described, f"--{flag} has no help text"


# ---- text flags


def _records(**seen):
    def command(name: Optional[str] = None, folder: str = "out", count: int = 1):
        seen.update(name=name, folder=folder, count=count)
    return command, seen


@pytest.mark.parametrize("argv,name,folder,count", [
    (["--name", "007", "--count", "3"], "007", "out", 3),  # fire alone: the int 7
    (["--name=1e3", "--folder", "2024"], "1e3", "2024", 1),  # a float, an int
    (["--name", "'quoted'"], "quoted", "out", 1),  # already a string literal: as it is
    (["--name", "None"], None, "out", 1),
    (["--name", "[1, 2]", "--folder=True"], "[1, 2]", "True", 1),  # a list, a bool
])
def test_flags_typed_str_keep_their_text(argv, name, folder, count):
    command, seen = _records()
    cli.run(command, command=argv)
    assert (seen["name"], seen["folder"], seen["count"]) == (name, folder, count)


def test_a_dict_of_commands_keeps_the_text_of_the_named_commands_flags():
    first, seen_first = _records()
    second, seen_second = _records()
    cli.run({"first": first, "second": second}, command=["second", "--folder", "0012"])
    assert seen_second["folder"] == "0012" and not seen_first
