"""The serving benchmarks' workload and what a run of it records: seeded requests of mixed lengths, arriving at
once or as a Poisson process, driven through an engine against the wall clock, and the summary figures
(throughput, time to first token, inter-token latency, slot occupancy). Used by llama.bench_serving (the
engine driven directly) and llama.bench_http (through a server, and directly)."""

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from llama.engine import Engine
from llama.measure import percentile
from llama.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Request:
    arrival: float  # seconds after the run's start
    prompt: List[int]
    max_gen_len: int


def make_workload(n: int, prompt_range: Sequence[int], gen_range: Sequence[int], vocab_size: int, seed: int,
                  arrival_rate: Optional[float] = None) -> List[Request]:
    """n requests, lengths uniform in the inclusive ranges, token ids uniform in [0, vocab_size), in arrival
    order: all at 0, or (arrival_rate > 0) a Poisson process, exponential gaps of mean 1 / arrival_rate.
    The requests depend on the seed only, the arrival times on the seed and the rate."""
    rng, clock = random.Random(seed), random.Random(seed + 1)
    requests, t = [], 0.0
    for _ in range(n):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_range))]
        requests.append(Request(t, prompt, rng.randint(*gen_range)))
        if arrival_rate:
            t += clock.expovariate(arrival_rate)
    return requests


def mean_occupancy(running_per_step: Sequence[int], slots: int) -> float:
    """Requests holding a slot over the slots, averaged over steps."""
    return sum(running_per_step) / (len(running_per_step) * slots)


def inter_token_latencies(token_times: Sequence[float]) -> List[float]:
    """The gaps between one request's consecutive tokens."""
    return [b - a for a, b in zip(token_times, token_times[1:])]


@dataclass
class Trace:
    """What one run recorded: times in seconds after its start, per workload request."""

    arrivals: List[float]
    token_times: List[List[float]] = field(default_factory=list)
    tokens: List[List[int]] = field(default_factory=list)
    running: List[int] = field(default_factory=list)  # requests holding a slot in each step
    wall_s: float = 0.0

    def __post_init__(self):
        self.token_times = [[] for _ in self.arrivals]
        self.tokens = [[] for _ in self.arrivals]


def drive(engine: Engine, workload: List[Request], on_step: Optional[Callable[[float], None]] = None,
          concurrency: Optional[int] = None) -> Trace:
    """Run the workload through engine against the wall clock. Without concurrency, a request is added once its
    arrival time has passed, between steps (with nothing to run, wait for the next arrival). With it, requests are
    added in order while fewer than concurrency are in the engine, as clients that each send their next request
    when their last ends (arrivals are then the times they were added). on_step(t) after each step."""
    trace = Trace([r.arrival for r in workload])
    which: Dict[int, int] = {}  # engine's request id -> workload index
    start = time.perf_counter()
    nxt = in_engine = 0
    while nxt < len(workload) or engine.has_work():
        now = time.perf_counter() - start
        while nxt < len(workload) and (in_engine < concurrency if concurrency else workload[nxt].arrival <= now):
            r = workload[nxt]
            if concurrency:
                trace.arrivals[nxt] = now
            which[engine.add_request(r.prompt, GREEDY, r.max_gen_len)] = nxt
            nxt, in_engine = nxt + 1, in_engine + 1
        if not engine.has_work():
            time.sleep(max(0.0, workload[nxt].arrival - now))
            continue
        outputs = engine.step()
        t = time.perf_counter() - start
        for out in outputs:
            i = which[out.request_id]
            trace.tokens[i] += out.new_tokens
            trace.token_times[i] += [t] * len(out.new_tokens)
            if out.error is not None:
                raise RuntimeError(f"request {i} failed") from out.error
            in_engine -= out.finished
        trace.running.append(engine.num_running + sum(out.finished for out in outputs))
        if on_step is not None:
            on_step(t)
    trace.wall_s = time.perf_counter() - start
    return trace


def summarize(trace: Trace, slots: int) -> dict:
    """Throughput, time to first token and inter-token latency (p50, p99), mean slot occupancy."""
    generated = sum(len(t) for t in trace.tokens)
    ttft = [times[0] - arrival for times, arrival in zip(trace.token_times, trace.arrivals) if times]
    itl = [gap for times in trace.token_times for gap in inter_token_latencies(times)]
    out = {"requests": len(trace.arrivals), "generated_tokens": generated, "wall_s": trace.wall_s,
           "throughput_tok_s": generated / trace.wall_s, "steps": len(trace.running)}
    for name, values in (("ttft", ttft), ("itl", itl)):
        out[f"{name}_p50_s"], out[f"{name}_p99_s"] = percentile(values, 50), percentile(values, 99)
    if trace.running:
        out["occupancy_mean"] = mean_occupancy(trace.running, slots)
    return out
