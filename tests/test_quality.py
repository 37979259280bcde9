"""python -m llama.quality on the trained stories260K model and the held-out text in tests/data."""

import pytest

from llama.quality import format_table, measure, prompts_from
from tests.conftest import REPO

HELD_OUT = REPO / "tests" / "data" / "stories_heldout.txt"


def test_prompts_are_spread_over_the_text():
    tokens = [1] + list(range(100, 200))
    prompts = prompts_from(tokens, 4, 5)
    assert [p[0] for p in prompts] == [1] * 4 and all(len(p) == 6 for p in prompts)
    assert [p[1] for p in prompts] == [100, 131, 162, 193]  # every (100 - 5) // 3 = 31 tokens


def test_int8_keeps_perplexity_within_one_percent_and_int4_says_why_it_does_not_apply(stories260k):
    rows = measure(str(stories260k), str(stories260k / "tokenizer.model"), HELD_OUT.read_text(),
                   ("float32", "int8", "w8a8", "int4-g32"), prompts=8, gen_len=16, max_seq_len=128, device="cpu")
    float32, int8, w8a8, int4 = rows
    assert float32["tokens_equal"] == 1.0 and 3 < float32["perplexity"] < 7  # a trained model on its kind of text
    for quantized in (int8, w8a8):
        assert quantized["perplexity"] == pytest.approx(float32["perplexity"], rel=0.01)
        assert 0.5 < quantized["tokens_equal"] <= 1.0
    assert "out_features=172" in int4["refused"] and "use int8" in int4["refused"]
    table = format_table(rows)
    assert "| int8 |" in table and "does not apply" in table


def test_stop_token_ids_flag_of_the_examples():
    from tests.conftest import check_exit, launch

    proc = launch(["example_text_completion.py", "--device", "cpu", "--temperature", "0", "--max_seq_len", "512",
                   "--max_gen_len", "400", "--stop_token_ids", "1"])
    check_exit(proc)
    story = proc.stdout.split("> ", 1)[1].split("\n\n====", 1)[0]
    assert story.endswith("You are a good friend.\"")  # where the model ends its story with BOS
    proc = launch(["example_text_completion.py", "--device", "cpu", "--stop_token_ids", "[1, 99999]"])
    assert proc.returncode != 0 and "--stop_token_ids" in proc.stderr and "Traceback" not in proc.stderr
