"""The benchmarks' measuring helpers (llama/measure.py) on their own; tests/test_bench.py runs them in the benchmark."""

import pytest
import torch

from llama.measure import decode_speed, time_generators


def test_decode_speed_takes_the_best_times_and_splits_off_the_first_token():
    # Best 1-token run 0.2 s, best 9-token run 1.0 s: 8 decode steps of 0.1 s for a batch of 4.
    s = decode_speed([0.3, 0.2], [1.0, 1.4], batch=4, prompt_len=50, gen_len=9, step_bytes=5_000_000_000)
    assert s["ttft_s"] == 0.2 and s["total_s"] == 1.0
    assert s["decode_step_s"] == pytest.approx(0.1) and s["decode_tok_s"] == pytest.approx(40)
    assert s["prefill_tok_s"] == pytest.approx(4 * 50 / 0.2) and s["e2e_tok_s"] == pytest.approx(4 * 9 / 1.0)
    assert s["achieved_gbs"] == pytest.approx(50)  # 5 GB a step in 0.1 s
    assert s["times_first_s"] == [0.3, 0.2] and s["times_total_s"] == [1.0, 1.4]  # every time is kept
    # Noise that leaves the long runs no slower than the short ones gives no decode figures, not a negative one.
    noisy = decode_speed([0.5], [0.4], batch=1, prompt_len=8, gen_len=4, step_bytes=None)
    assert noisy["decode_step_s"] is None and noisy["decode_tok_s"] is None and "achieved_gbs" not in noisy


def test_time_generators_take_turns_and_check_the_lengths():
    calls = []

    def make(name):
        def generate(prompts, n):
            calls.append((name, n))
            return [[0] * n for _ in prompts]
        return generate

    out = time_generators({"a": make("a"), "b": make("b")}, [[1], [2]], 3, torch.device("cpu"), warmup=1, repeats=2)
    # Each round: both 1-token runs, then both long runs; warm-up rounds are not timed.
    assert calls == [("a", 1), ("b", 1), ("a", 3), ("b", 3)] * 3
    assert all(len(out[name][0]) == 2 and len(out[name][1]) == 2 and out[name][2] == [[0] * 3] * 2 for name in "ab")
    with pytest.raises(RuntimeError, match="gave \\[2\\] new tokens per row, not 3"):
        time_generators({"short": lambda prompts, n: [[0] * min(n, 2) for _ in prompts]}, [[1]], 3, torch.device("cpu"),
                        warmup=0, repeats=1)
