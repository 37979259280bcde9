"""python -m llama.perplexity: sliding windows that score each token once, against a float64 computation."""

import json
import math

import pytest
import torch

from llama.perplexity import main, negative_log_likelihoods, windows
from tests.conftest import check_exit, launch
from tests.naive_llama import naive_logits

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play with her toys in the garden. "
         "One day, she saw a big red ball under a tree. She ran to the ball and picked it up. Her friend Tom came and "
         "said, \"Can we play together?\" Lily smiled and said, \"Yes, let's play!\" They played all day.")


@pytest.mark.parametrize("n", [2, 3, 10, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("max_seq_len,stride", [(32, 8), (32, 16), (32, 31), (32, 32), (8, 1)])
def test_windows_score_every_token_after_bos_once_with_the_context_a_window_gives(n, max_seq_len, stride):
    spans = windows(n, max_seq_len, stride)
    scored = [i for _, end, first in spans for i in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in spans:
        assert 0 <= begin < first and end - begin <= max_seq_len
        for i in range(first, end):  # token i sees tokens begin..i-1
            assert i - begin >= min(i, max_seq_len - stride, max_seq_len - 1) or begin == 0
    if n <= max_seq_len:
        assert spans == [(0, n, 1)]  # shorter than a window, or exactly one


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="stride=0 must be between 1 and max_seq_len=8"):
        windows(10, 8, 0)
    with pytest.raises(ValueError, match="stride=9"):
        windows(10, 8, 9)
    with pytest.raises(ValueError, match="no token after BOS"):
        windows(1, 8, 4)
    with pytest.raises(ValueError, match="max_seq_len must be an integer of at least 2"):
        windows(10, 1, 1)  # a window of one token scores nothing: it looped forever
    assert windows(4, 2, 1) == [(0, 2, 1), (1, 3, 2), (2, 4, 3)]


@pytest.fixture(scope="module")
def stories(stories260k):
    from llama import Llama

    sd = torch.load(stories260k / "consolidated.00.pth", weights_only=True)
    params = json.loads((stories260k / "params.json").read_text())
    generator = Llama.build(str(stories260k), str(stories260k / "tokenizer.model"), 64, 4, device="cpu")
    return generator, sd, params


@pytest.mark.parametrize("max_seq_len,stride", [(64, 64), (64, 32), (64, 16), (48, 48)],
                         ids=["shorter-than-a-window", "overlapping", "quarter-stride", "stride-equals-window"])
def test_nll_equals_a_float64_computation(stories, max_seq_len, stride):
    generator, sd, params = stories
    tokens = generator.tokenizer.encode(STORY if max_seq_len != 64 or stride != 64 else STORY[:150], bos=True, eos=False)
    forward = lambda ids: generator.model.forward(ids, 0)  # noqa: E731
    nll = negative_log_likelihoods(forward, tokens, max_seq_len, stride, 4, "cpu")
    expected = torch.empty(len(tokens) - 1, dtype=torch.float64)
    for begin, end, first in windows(len(tokens), max_seq_len, stride):
        logp = torch.log_softmax(naive_logits(sd, params, tokens[begin:end]), dim=-1)
        for i in range(first, end):
            expected[i - 1] = -logp[i - 1 - begin, tokens[i]]
    torch.testing.assert_close(nll, expected, atol=2e-4, rtol=0)
    assert 0.3 < nll.mean().item() < 3  # a trained model on its own kind of text


def test_cli_and_json(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text(STORY)
    out = tmp_path / "ppl.json"
    proc = launch(["-m", "llama.perplexity", "--text", text, "--device", "cpu", "--max_seq_len", "64", "--stride", "32",
                   "--json", out])
    check_exit(proc)
    result = json.loads(out.read_text())
    assert set(result) == {"tokens", "mean_nll", "perplexity"}
    assert result["perplexity"] == pytest.approx(math.exp(result["mean_nll"]))
    assert f"tokens scored: {result['tokens']}" in proc.stdout and "perplexity:" in proc.stdout
    # The same under torchrun with 2 ranks (rank 0 reports), and int8 close to float.
    out2 = tmp_path / "ppl2.json"
    proc = launch(["-m", "llama.perplexity", "--text", text, "--device", "cpu", "--max_seq_len", "64", "--stride", "32",
                   "--json", out2], nproc=2)
    check_exit(proc)
    assert proc.stdout.count("tokens scored") == 1
    assert json.loads(out2.read_text())["mean_nll"] == pytest.approx(result["mean_nll"], abs=1e-4)
    int8 = main(str(text), max_seq_len=64, stride=32, device="cpu", quantize="int8")
    assert int8["tokens"] == result["tokens"] and abs(int8["mean_nll"] - result["mean_nll"]) < 0.05


def test_cli_errors_are_one_line(tmp_path):
    proc = launch(["-m", "llama.perplexity", "--text", tmp_path / "missing.txt"])
    assert proc.returncode != 0 and "is not a file" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "t.txt").write_text("hi")
    proc = launch(["-m", "llama.perplexity", "--text", tmp_path / "t.txt", "--max_seq_len", "8", "--stride", "9"])
    assert proc.returncode != 0 and "stride=9" in proc.stderr and "Traceback" not in proc.stderr
    proc = launch(["-m", "llama.quality", "--text", tmp_path / "t.txt", "--prompts", "0"])
    assert proc.returncode == 2 and "prompts must be a positive integer" in proc.stderr and "Traceback" not in proc.stderr
