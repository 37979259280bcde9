"""Host memory while loading: shards are memory-mapped, so a rank holds about its own weights, not the files too."""

import sys

import pytest

from tests.checkpoints import random_state_dict, tiny_params, write_checkpoint
from tests.conftest import REPO, check_exit, launch

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssAnon from /proc")


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
