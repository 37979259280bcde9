"""Both example scripts end to end on a tiny checkpoint: under torchrun with 2 ranks, and as plain python."""

import pytest

from tests.conftest import check_exit, launch

SEPARATOR = "=================================="


def run(args, nproc):
    proc = launch(args, nproc)
    check_exit(proc)
    return proc


@pytest.mark.parametrize("nproc,shards", [(2, 2), (0, 1)], ids=["torchrun-2", "python"])
def test_text_completion_example(tiny_checkpoints, tiny_tokenizer_path, nproc, shards):
    proc = run(
        ["example_text_completion.py", "--ckpt_dir", str(tiny_checkpoints[(2, shards)]),
         "--tokenizer_path", str(tiny_tokenizer_path), "--max_seq_len", "160", "--max_gen_len", "8",
         "--device", "cpu", "--temperature", "0"],
        nproc,
    )
    # Four prompts, printed once (rank 0 only), and one load report; fairscale's set-up notes are not results.
    assert proc.stdout.count(SEPARATOR) == 4
    assert "initializing model parallel" not in proc.stdout
    assert proc.stdout.count("I believe the meaning of life is") == 1
    assert (proc.stdout + proc.stderr).count("Loaded ") == 1


@pytest.mark.parametrize("nproc,shards", [(2, 2), (0, 1)], ids=["torchrun-2", "python"])
def test_chat_completion_example(tiny_checkpoints, tiny_tokenizer_path, nproc, shards):
    proc = run(
        ["example_chat_completion.py", "--ckpt_dir", str(tiny_checkpoints[(None, shards)]),
         "--tokenizer_path", str(tiny_tokenizer_path), "--max_seq_len", "512", "--max_gen_len", "6",
         "--max_batch_size", "4", "--device", "cpu", "--dtype", "bfloat16"],
        nproc,
    )
    assert proc.stdout.count(SEPARATOR) == 6
    assert proc.stdout.count("> Assistant: Error: special tags are not allowed as part of the prompt.") == 1
    assert proc.stdout.count("User: what is the recipe of mayonnaise?") == 1


def test_a_rank_left_in_the_shell_does_not_silence_a_plain_process():
    """RANK=1 exported without torchrun (no WORLD_SIZE): the library runs one process, so the example reports."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(RANK="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "example_text_completion.py", "--device", "cpu", "--max_gen_len", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    check_exit(proc)
    assert proc.stdout.count(SEPARATOR) == 3  # the demo model's three prompts
