import hashlib
import os
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from tests.checkpoints import random_state_dict, tiny_params, write_checkpoint

# Tiny models gain nothing from threads, and OpenMP threads spin badly when the suite's
# subprocesses share the cores: one thread each keeps the suite fast and steady.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def compile_cache_dir(tmp_path_factory):
    """Compiled decode steps go to a directory of this run (the suite's subprocesses inherit it), never to the
    user's cache."""
    from llama.compile_cache import CACHE_VARIABLE

    saved = os.environ.get(CACHE_VARIABLE)
    os.environ[CACHE_VARIABLE] = str(tmp_path_factory.mktemp("compiled"))
    yield Path(os.environ[CACHE_VARIABLE])
    if saved is None:
        del os.environ[CACHE_VARIABLE]
    else:
        os.environ[CACHE_VARIABLE] = saved


def launch(args: list, nproc: int = 0, timeout: float = 300, input: str = None):
    """Run a python script in a fresh process: plain python when nproc is 0, else torchrun with nproc ranks.

    input, when given, is the script's stdin (else stdin is inherited)."""
    import subprocess
    import sys

    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(launcher + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, input=input)


def check_exit(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-4000:]}\n--- stdout\n{proc.stdout[-2000:]}"
LLAMA2_TOKENIZER = REPO.parent / "shared" / "tokenizer" / "llama2-tokenizer.model"
LLAMA2_TOKENIZER_MD5 = "eeec4125e9c7560836b4873b6f8e3025"

CORPUS = """The quick brown fox jumps over the lazy dog. Llamas live in the Andes mountains.
A language model predicts the next token from the tokens before it. Hello world!
Paris is the capital of France. Numbers: 0 1 2 3 4 5 6 7 8 9. Questions end with a mark?
""" * 20


@pytest.fixture(scope="session")
def llama2_tokenizer_path() -> Path:
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"the real Llama 2 tokenizer is not at {LLAMA2_TOKENIZER} (it sits in ../shared beside this repo's CI checkout)")
    if hashlib.md5(LLAMA2_TOKENIZER.read_bytes()).hexdigest() != LLAMA2_TOKENIZER_MD5:
        pytest.skip(f"{LLAMA2_TOKENIZER} is not the Llama 2 tokenizer (md5 differs from {LLAMA2_TOKENIZER_MD5})")
    return LLAMA2_TOKENIZER


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """A small SentencePiece model with Llama's special ids (unk 0, bos 1, eos 2, no pad)."""
    d = tmp_path_factory.mktemp("tokenizer")
    (d / "corpus.txt").write_text(CORPUS)
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tiny"), vocab_size=96, model_type="bpe",
        character_coverage=1.0, minloglevel=2, hard_vocab_limit=False,
    )
    return d / "tiny.model"


@pytest.fixture(scope="session")
def tiny_vocab(tiny_tokenizer_path) -> int:
    return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_path)).vocab_size()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, tiny_vocab):
    """One set of random weights (MHA and GQA) written as 1 and 2 shards: {(kv_heads, shards): dir}."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for kv in (None, 2):
        params = tiny_params(-1, n_kv_heads=kv)
        sd = random_state_dict({**params, "vocab_size": tiny_vocab}, seed=0)
        for shards in (1, 2):
            out[(kv, shards)] = write_checkpoint(root / f"kv{kv}-mp{shards}", params, sd, shards)
    return out


STORIES260K = REPO.parent / "shared" / "models" / "stories260K"


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """The small trained Llama in ../shared (see its README), or the same files bundled as the demo model: real
    weights, where random ones cannot tell right from wrong."""
    if (STORIES260K / "consolidated.00.pth").is_file():
        return STORIES260K
    from llama import demo_model_dir

    return demo_model_dir()
