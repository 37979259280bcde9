"""The serving benchmarks' workload (llama/workload.py): seeded requests, the trace of a run through an engine,
and its summary figures against direct formulas (no timing assertions)."""

import pytest
import torch

from llama.engine import Engine
from llama.measure import percentile
from llama.random_model import NoTextTokenizer, build_random_model
from llama.workload import Request, drive, inter_token_latencies, make_workload, mean_occupancy, summarize


def test_occupancy_and_inter_token_latencies():
    running = [3, 3, 2, 1, 3]
    assert mean_occupancy(running, 4) == pytest.approx((3 + 3 + 2 + 1 + 3) / (5 * 4))
    assert inter_token_latencies([0.5, 0.75, 1.5]) == [0.25, 0.75]
    assert inter_token_latencies([0.5]) == []


def test_workload_is_seeded_within_ranges_and_arrives_as_a_poisson_process():
    offline = make_workload(2000, (16, 256), (16, 128), 512, seed=3)
    assert offline == make_workload(2000, (16, 256), (16, 128), 512, seed=3)
    assert {r.arrival for r in offline} == {0.0}
    lengths, gens = [len(r.prompt) for r in offline], [r.max_gen_len for r in offline]
    assert min(lengths) == 16 and max(lengths) == 256 and min(gens) == 16 and max(gens) == 128
    assert all(0 <= t < 512 for r in offline[:50] for t in r.prompt)
    arriving = make_workload(2000, (16, 256), (16, 128), 512, seed=3, arrival_rate=4.0)
    # The same requests, arriving over time: gaps exponential with mean 1/4 s (sd of the mean: 0.25/sqrt(2000)).
    assert [(r.prompt, r.max_gen_len) for r in arriving] == [(r.prompt, r.max_gen_len) for r in offline]
    gaps = [b.arrival - a.arrival for a, b in zip(arriving, arriving[1:])]
    assert min(gaps) >= 0 and sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.1)


def _engine(slots=2, policy="continuous", max_seq_len=64):
    model = build_random_model("tiny", torch.device("cpu"), torch.float32, max_seq_len, slots)
    return Engine(model, NoTextTokenizer(model.vocab_size), policy=policy)


def test_drive_records_tokens_times_and_occupancy():
    # Two requests filling both slots from the first step: every step runs both, so occupancy is 1.
    workload = [Request(0.0, [1, 2, 3, 4], 5), Request(0.0, [5, 6, 7, 8], 5)]
    trace = drive(_engine(), workload)
    assert [len(t) for t in trace.tokens] == [5, 5] and trace.running == [2] * 5
    s = summarize(trace, 2)
    assert s["steps"] == 5 and s["occupancy_mean"] == 1.0 and s["generated_tokens"] == 10
    assert s["throughput_tok_s"] == pytest.approx(10 / trace.wall_s)
    # Both got their first token from the first step, and every later token a step after the one before.
    assert trace.token_times[0] == trace.token_times[1] and sorted(set(trace.token_times[0])) == trace.token_times[0]
    assert s["ttft_p50_s"] == trace.token_times[0][0]
    itl = inter_token_latencies(trace.token_times[0])
    assert s["itl_p50_s"] == pytest.approx(percentile(itl + itl, 50))


def test_drive_adds_a_request_once_its_arrival_time_has_passed():
    workload = [Request(0.0, [1, 2, 3], 3), Request(0.3, [4, 5, 6], 3)]
    trace = drive(_engine(), workload)
    assert trace.token_times[1][0] >= 0.3 and trace.wall_s >= 0.3
    s = summarize(trace, 2)
    assert 0 <= s["ttft_p50_s"] <= s["ttft_p99_s"]
    # The first request ran alone (3 steps), the engine idled, then the second ran alone: half the slots.
    assert trace.running == [1] * 6 and s["occupancy_mean"] == 0.5


def test_closed_loop_keeps_at_most_concurrency_requests_in_the_engine():
    model = build_random_model("tiny", torch.device("cpu"), torch.float32, 64, 4)
    engine = Engine(model, NoTextTokenizer(model.vocab_size))
    workload = make_workload(7, (4, 12), (2, 6), model.vocab_size, seed=1)
    trace = drive(engine, workload, concurrency=2)
    assert [len(t) for t in trace.tokens] == [r.max_gen_len for r in workload]
    assert max(trace.running) == 2 and trace.arrivals == sorted(trace.arrivals)
    # Request i + 2 is added only once an earlier one has ended.
    ends = sorted(times[-1] for times in trace.token_times)
    assert all(trace.arrivals[i + 2] >= ends[i] for i in range(5))
    # The same tokens as the open-loop drive (greedy, EOS off).
    assert trace.tokens == drive(Engine(model, NoTextTokenizer(model.vocab_size)), workload).tokens
