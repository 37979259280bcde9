"""Both example scripts end to end on a tiny checkpoint: under torchrun with 2 ranks, and as plain python."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SEPARATOR = "=================================="


def run(args, launcher):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-4000:]}\n--- stdout\n{proc.stdout[-2000:]}"
    return proc


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
PLAIN = [sys.executable]


@pytest.mark.parametrize("launcher,shards", [(TORCHRUN_2, 2), (PLAIN, 1)], ids=["torchrun-2", "python"])
def test_text_completion_example(tiny_checkpoints, tiny_tokenizer_path, launcher, shards):
    proc = run(
        ["example_text_completion.py", "--ckpt_dir", str(tiny_checkpoints[(2, shards)]),
         "--tokenizer_path", str(tiny_tokenizer_path), "--max_seq_len", "160", "--max_gen_len", "8",
         "--device", "cpu", "--temperature", "0"],
        launcher,
    )
    # Four prompts, printed once (rank 0 only), and one load report.
    assert proc.stdout.count(SEPARATOR) == 4
    assert proc.stdout.count("I believe the meaning of life is") == 1
    assert (proc.stdout + proc.stderr).count("Loaded ") == 1


@pytest.mark.parametrize("launcher,shards", [(TORCHRUN_2, 2), (PLAIN, 1)], ids=["torchrun-2", "python"])
def test_chat_completion_example(tiny_checkpoints, tiny_tokenizer_path, launcher, shards):
    proc = run(
        ["example_chat_completion.py", "--ckpt_dir", str(tiny_checkpoints[(None, shards)]),
         "--tokenizer_path", str(tiny_tokenizer_path), "--max_seq_len", "512", "--max_gen_len", "6",
         "--max_batch_size", "4", "--device", "cpu", "--dtype", "bfloat16"],
        launcher,
    )
    assert proc.stdout.count(SEPARATOR) == 6
    assert proc.stdout.count("> Assistant: Error: special tags are not allowed as part of the prompt.") == 1
    assert proc.stdout.count("User: what is the recipe of mayonnaise?") == 1
