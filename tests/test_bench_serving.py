"""python -m llama.bench_serving: percentiles against a direct formula, and smoke runs on the
tiny shape on the CPU that check every reported figure is present, finite and consistent (no timing
assertions)."""

import json
import math
import random

import pytest

from llama import bench_serving as bs
from llama.workload import make_workload
from llama.measure import percentile
from tests.conftest import check_exit, launch

SMALL = dict(shape="tiny", device="cpu", max_batch_size=3, requests=6, prompt_min=4, prompt_max=20, gen_min=2,
             gen_max=10, arrival_rate=50.0, join_prompt_len=40, join_chunks=(8, 32))
FIGURES = ("throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "occupancy_mean", "wall_s")


def test_percentile_is_linear_interpolation_between_ranks():
    values = [random.Random(0).uniform(0, 10) for _ in range(37)]
    ordered = sorted(values)
    for q in (0, 1, 25, 50, 90, 99, 100):
        rank = q / 100 * 36
        low, frac = int(rank), rank - int(rank)
        direct = ordered[low] + frac * (ordered[min(low + 1, 36)] - ordered[low])
        assert percentile(values, q) == pytest.approx(direct)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(range(101)), 99) == 99
    assert percentile([5.0], 99) == 5.0
    np = pytest.importorskip("numpy")
    assert percentile(values, 99) == pytest.approx(float(np.percentile(values, 99)))
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def _check_summary(s: dict, gen_tokens: int, requests: int) -> None:
    for key in FIGURES:
        assert s[key] is not None and math.isfinite(s[key]) and s[key] > 0, (key, s[key])
    assert s["generated_tokens"] == gen_tokens and s["requests"] == requests  # EOS off: every token asked for
    assert s["throughput_tok_s"] == pytest.approx(s["generated_tokens"] / s["wall_s"])
    assert 0 < s["occupancy_mean"] <= 1
    assert s["ttft_p50_s"] <= s["ttft_p99_s"] and s["itl_p50_s"] <= s["itl_p99_s"]


def test_run_reports_every_figure(capsys):
    pytest.importorskip("transformers")
    r = bs.main(**SMALL, compare_hf=True)
    w = r["workload"]
    assert w["requests"] == 6 and r["max_seq_len"] == 41  # the 40-token prompt and its one token
    workload = make_workload(6, (4, 20), (2, 10), 512, seed=0)
    assert w["gen_tokens"] == sum(x.max_gen_len for x in workload) and w["prompt_tokens"] == sum(len(x.prompt) for x in workload)
    for mode in ("offline", "poisson"):
        for policy in ("continuous", "static"):
            _check_summary(r[mode][policy], w["gen_tokens"], 6)
        ratio = r[mode]["continuous"]["throughput_tok_s"] / r[mode]["static"]["throughput_tok_s"]
        assert r["speedup_continuous_over_static"][mode] == pytest.approx(ratio)
    assert r["poisson"]["arrival_rate"] == 50.0
    # Greedy, EOS off: the policies only change which requests share a step, not a request's tokens.
    assert r["static_tokens_equal"] == 1.0
    hf = r["hf"]
    _check_summary(hf["offline"], w["gen_tokens"], 6)
    assert hf["tokens_equal"] == 1.0  # the same weights, float32, greedy, left padding masked out
    for policy in ("continuous", "static"):
        expected = r["offline"][policy]["throughput_tok_s"] / hf["offline"]["throughput_tok_s"]
        assert r["speedup_over_hf"][policy] == pytest.approx(expected)
    chunks = r["join"]["chunks"]
    assert [c["prefill_chunk"] for c in chunks] == [8, 32] and r["join"]["prompt_len"] == 40
    for c in chunks:
        assert c["running"] == 2 and c["gaps_during"] >= 2 * math.ceil(40 / c["prefill_chunk"]) - 2
        for key in ("itl_p50_s", "itl_p99_s", "itl_max_s", "itl_before_p50_s", "long_ttft_s"):
            assert math.isfinite(c[key]) and c[key] > 0, (c, key)
        assert c["itl_p50_s"] <= c["itl_p99_s"] <= c["itl_max_s"]
    assert r["graphs_compiled_during_timed_runs"] == 0
    assert r["prefill_chunk"] == 128 and r["max_prefill_tokens"] == 8192  # the engine's CPU defaults
    assert r["other_processes_cpu_s"] is None or r["other_processes_cpu_s"] >= 0
    assert 0 < r["run_wall_s"] and r["offline"]["continuous"]["wall_s"] + r["offline"]["static"]["wall_s"] < r["run_wall_s"]
    table = capsys.readouterr().out
    assert "offline: all 6 at once" in table and "Poisson arrivals, 50 per second" in table
    assert "a 40-token prompt joins 2 running requests" in table and "cont/HF" in table


def test_cli_writes_json(tmp_path):
    out = tmp_path / "r.json"
    args = ["-m", "llama.bench_serving"] + [f"--{k}={v}" for k, v in SMALL.items() if k != "join_chunks"]
    args += ["--join_chunks", "16", "--arrival_rate", "0", "--repeats", "2", "--json", out]
    proc = launch(args, timeout=180)
    check_exit(proc)
    r = json.loads(out.read_text())
    assert "poisson" not in r and "hf" not in r and r["repeats"] == 2 and r["max_prefill_tokens"] == 8192
    assert [c["prefill_chunk"] for c in r["join"]["chunks"]] == [16]
    for policy in ("continuous", "static"):
        s = r["offline"][policy]
        _check_summary(s, r["workload"]["gen_tokens"], 6)
        assert len(s["walls_s"]) == 2 and s["wall_s"] == min(s["walls_s"])
    assert "offline: all 6 at once" in proc.stdout and "{" not in proc.stdout


def test_bad_arguments():
    with pytest.raises(ValueError, match="gen_min must be at least 2"):
        bs.run(**{**SMALL, "gen_min": 1})
    with pytest.raises(ValueError, match="prompt_max must be an integer >= prompt_min"):
        bs.run(**{**SMALL, "prompt_max": 3})
    with pytest.raises(ValueError, match="max_seq_len must be an integer >= 41"):
        bs.run(**SMALL, max_seq_len=40)
    with pytest.raises(ValueError, match=r"join_chunks\[1\] must be a positive integer"):
        bs.run(**{**SMALL, "join_chunks": (8, 0)})
    with pytest.raises(ValueError, match=r"join_chunks must be a chunk size or a list of them"):
        bs.run(**{**SMALL, "join_chunks": "abc"})  # fire hands on a word as text
    with pytest.raises(ValueError, match="arrival_rate"):
        bs.run(**{**SMALL, "arrival_rate": -1})
    with pytest.raises(ValueError, match="prefill_chunk must be a positive integer"):
        bs.run(**SMALL, prefill_chunk=0)
    with pytest.raises(ValueError, match="max_prefill_tokens must be a positive integer"):
        bs.run(**SMALL, max_prefill_tokens=0)
    with pytest.raises(ValueError, match="quantize='int3' is not a known scheme"):
        bs.run(**SMALL, quantize="int3")
    with pytest.raises(ValueError, match="drop --quantize or --compare_hf"):
        bs.run(**SMALL, quantize="w8a8", compare_hf=True)


def test_quantized_model_serves_the_workload(capsys):
    r = bs.main(**{**SMALL, "arrival_rate": 0, "join_chunks": []}, quantize="w8a8")
    assert r["quantize"] == "w8a8" and r["params"] > 1e5  # counted before the layers became int8 buffers
    for policy in ("continuous", "static"):
        _check_summary(r["offline"][policy], r["workload"]["gen_tokens"], 6)
    assert r["static_tokens_equal"] == 1.0
    assert ", weights w8a8," in capsys.readouterr().out
