"""Serving benchmark: a mixed workload through the continuous-batching engine, on a random model.

    python -m llama.bench_serving --shape 134M --device cpu --dtype float32 --max_batch_size 8 --compile --compare_hf

A seeded workload (prompt lengths and max_gen_len uniform in ranges, random token ids, greedy, EOS off)
runs through llama.engine.Engine, driven directly, under the continuous and the static policy: all at once
(offline), and arriving as a Poisson process (each request added once its arrival time has passed on the
wall clock, the engine stepped in between). Every token gets the time of the step that produced it.
Reported: throughput, time to first token and inter-token latency p50/p99, mean slot occupancy; with
--compare_hf, transformers' generate in left-padded static batches; and the running requests' inter-token
latency while a long prompt joins them, for several prefill chunk sizes. See README.md, "Serving benchmark".
"""

import os
import random
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch._dynamo.utils import counters

from llama import hf_baseline, quantize as quantization
from llama.checks import check_positive_int, check_seed
from llama.compiled import CompiledDecodeStep
from llama.device import resolve_device, resolve_dtype
from llama.engine import Engine, check_prefill_options
from llama.measure import (OtherLoad, check_output_path, copy_bandwidth, device_name, percentile, report,
                           tokens_equal_share, write_json)
from llama.random_model import NoTextTokenizer, build_random_model
from llama.workload import GREEDY, Request, Trace, drive, make_workload, summarize

POLICIES = ("continuous", "static")


def _progress(message: str) -> None:
    """A line on stderr as each part of a long run ends (the table comes at the end, on stdout)."""
    print(f"[bench_serving {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _best_of(repeats: int, runs: Dict[str, Callable[[], Trace]], slots: int):
    """Each run repeats times, the runs taking turns; per run, the summary of the fastest (every wall time
    kept) and the tokens."""
    best: Dict[str, tuple] = {}
    walls: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run_once in runs.items():
            trace = run_once()
            walls[name].append(trace.wall_s)
            _progress(f"{name}: {trace.wall_s:.1f} s, {len(trace.running)} steps")
            if name not in best or trace.wall_s < best[name].wall_s:
                best[name] = trace
    return {name: {**summarize(t, slots), "walls_s": walls[name]} for name, t in best.items()}, \
        {name: t.tokens for name, t in best.items()}


def hf_static(hf, workload: List[Request], batch: int, device: torch.device) -> Trace:
    """The workload (all at once) through transformers' generate in batches of batch in arrival order, each
    left-padded and generating its longest max_gen_len; each request keeps its own max_gen_len tokens."""
    trace = Trace([0.0] * len(workload))
    start = time.perf_counter()
    for first in range(0, len(workload), batch):
        group = workload[first:first + batch]
        times: List[float] = []
        rows = hf_baseline.generate(hf, [r.prompt for r in group], max(r.max_gen_len for r in group), device, times)
        # Occupancy counts the rows still wanted: a row past its request's max_gen_len is wasted work.
        trace.running += [sum(r.max_gen_len > k for r in group) for k in range(len(times))]
        for i, (r, row) in enumerate(zip(group, rows)):
            trace.tokens[first + i] = row[: r.max_gen_len]
            trace.token_times[first + i] = [t - start for t in times[: r.max_gen_len]]
    trace.wall_s = time.perf_counter() - start
    return trace


def long_prompt_joins(model, tokenizer, decode, chunk: int, prompt_len: int, short_len: int, seed: int) -> dict:
    """slots - 1 requests of short_len-token prompts decode; once each has 8 tokens, a prompt_len-token
    prompt joins (max_gen_len 1). The running requests' inter-token latencies from its arrival to its
    first token (p50, p99), theirs before it arrived (p50), and its time to first token."""
    slots = model.cache_shape[0]
    engine = Engine(model, tokenizer, prefill_chunk=chunk, decode=decode)
    rng = random.Random(seed)
    # Enough tokens that the running requests outlast the long prompt's reading.
    gen = 8 + -(-(slots - 1) * short_len // chunk) + -(-prompt_len // chunk) + 4
    times: Dict[int, List[float]] = {
        engine.add_request([rng.randrange(model.vocab_size) for _ in range(short_len)], GREEDY, gen): []
        for _ in range(slots - 1)}
    long_prompt = [rng.randrange(model.vocab_size) for _ in range(prompt_len)]
    long_id, join_at, first = None, None, None
    start = time.perf_counter()
    while first is None:
        if long_id is None and all(len(t) >= 8 for t in times.values()):
            join_at = time.perf_counter() - start
            long_id = engine.add_request(long_prompt, GREEDY, 1)
        if not engine.has_work():
            raise RuntimeError("the running requests ended before the long prompt's first token")
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            if out.request_id == long_id and out.new_tokens:
                first = now
            elif out.request_id in times:
                times[out.request_id] += [now] * len(out.new_tokens)
    for request_id in times:  # their remaining tokens are not needed
        engine.abort(request_id)
    while engine.has_work():
        engine.step()
    gaps = [(b, b - a) for t in times.values() for a, b in zip(t, t[1:])]
    during = [gap for end, gap in gaps if join_at < end <= first]
    before = [gap for end, gap in gaps if end <= join_at]
    _progress(f"a {prompt_len}-token prompt joined, prefill chunk {chunk}")
    return {"prefill_chunk": chunk, "running": slots - 1, "itl_p50_s": percentile(during, 50),
            "itl_p99_s": percentile(during, 99), "itl_max_s": max(during), "itl_before_p50_s": percentile(before, 50),
            "long_ttft_s": first - join_at, "gaps_during": len(during)}


def _positive_ints(**values) -> None:
    for name, value in values.items():
        check_positive_int(name, value)


def _check_args(max_batch_size, requests, prompt_range, gen_range, prefill_chunk, join_prompt_len, join_chunks,
                repeats, arrival_rate, max_seq_len=None, seed=0, max_prefill_tokens=8192):
    """ValueError naming a bad argument; else the join test's chunk sizes as a list, and max_seq_len (by default
    the longest prompt and generation of any run)."""
    _positive_ints(max_batch_size=max_batch_size, requests=requests, prompt_min=prompt_range[0], gen_min=gen_range[0],
                   join_prompt_len=join_prompt_len, repeats=repeats)
    check_prefill_options(prefill_chunk, max_prefill_tokens)
    check_seed(seed)
    for name, (low, high) in (("prompt", prompt_range), ("gen", gen_range)):
        if not isinstance(high, int) or isinstance(high, bool) or high < low:
            raise ValueError(f"{name}_max must be an integer >= {name}_min = {low}, got {high!r}")
    if gen_range[0] < 2:
        raise ValueError(f"gen_min must be at least 2 (an inter-token latency needs two tokens), got {gen_range[0]}")
    if arrival_rate is not None and (isinstance(arrival_rate, bool) or not isinstance(arrival_rate, (int, float)) or arrival_rate < 0):
        raise ValueError(f"arrival_rate must be a number >= 0 (0 or None: no Poisson run), got {arrival_rate!r}")
    if join_chunks is not None and not isinstance(join_chunks, (int, list, tuple)):  # a word comes as a str
        raise ValueError(f"join_chunks must be a chunk size or a list of them, e.g. [64,512] ([] for no join test), "
                         f"got {join_chunks!r}")
    chunks = [join_chunks] if isinstance(join_chunks, int) else list(join_chunks or [])
    _positive_ints(**{f"join_chunks[{i}]": c for i, c in enumerate(chunks)})
    need = max(prompt_range[1] + gen_range[1], join_prompt_len + 1 if chunks else 0)
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < need):
        raise ValueError(f"max_seq_len must be an integer >= {need} (the longest prompt and generation), got {max_seq_len!r}")
    return chunks, need if max_seq_len is None else max_seq_len


def _compare_hf(results: dict, model, workload: List[Request], ours: List[List[int]], device: torch.device) -> None:
    """transformers' static batches on the offline workload (the fastest of results["repeats"] runs): its
    figures, and ours against them."""
    import transformers

    hf = hf_baseline.hf_model(model, model.tok_embeddings.weight.dtype, device)
    batch = model.cache_shape[0]
    hf_baseline.generate(hf, [r.prompt for r in workload[:batch]], 2, device)  # warm-up, untimed
    summaries, tokens = _best_of(results["repeats"], {"transformers": lambda: hf_static(hf, workload, batch, device)}, batch)
    theirs = summaries["transformers"]
    results["hf"] = {"transformers": transformers.__version__, "attn_implementation": "sdpa", "offline": theirs,
                     "tokens_equal": tokens_equal_share(tokens["transformers"], ours)}
    results["speedup_over_hf"] = {p: results["offline"][p]["throughput_tok_s"] / theirs["throughput_tok_s"]
                                  for p in POLICIES}


def _describe(model, device: torch.device, workload: List[Request], prompt_range, gen_range, settings: dict,
              params: int) -> dict:
    """The results' header: what ran, on what, with which settings."""
    return {
        **settings, "params": params, "device": str(device),
        "device_name": device_name(device), "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "workload": {"requests": len(workload), "prompt_len": list(prompt_range), "max_gen_len": list(gen_range),
                     "prompt_tokens": sum(len(r.prompt) for r in workload),
                     "gen_tokens": sum(r.max_gen_len for r in workload)},
        "eos": "disabled (eos_id=-1): every request generates exactly its max_gen_len tokens",
    }


def run(shape: str = "134M", device: Optional[str] = None, dtype: Optional[str] = None, max_batch_size: int = 8,
        requests: int = 32, prompt_min: int = 16, prompt_max: int = 256, gen_min: int = 16, gen_max: int = 128,
        arrival_rate: Optional[float] = 1.0, prefill_chunk: Optional[int] = None, join_prompt_len: int = 2048,
        join_chunks=(128, 512), compare_hf: bool = False, compile: bool = False, repeats: int = 1, seed: int = 0,
        max_seq_len: Optional[int] = None, partial_json: Optional[str] = None, quantize: Optional[str] = None,
        max_prefill_tokens: int = 8192) -> dict:
    """Run the serving benchmark and return its results (see main for the arguments). partial_json: a path that
    gets the results so far after each part (a long run that is stopped keeps what it measured)."""
    prompt_range, gen_range = (prompt_min, prompt_max), (gen_min, gen_max)
    chunks, max_seq_len = _check_args(max_batch_size, requests, prompt_range, gen_range, prefill_chunk, join_prompt_len,
                                      join_chunks, repeats, arrival_rate, max_seq_len, seed, max_prefill_tokens)
    scheme = quantization.parse_quantize(quantize)
    if scheme is not None and compare_hf:
        raise ValueError("compare_hf runs transformers on the float weights, which a quantized model no longer has; "
                         "drop --quantize or --compare_hf")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    if scheme is not None:
        quantization.check_support(scheme, device, dtype)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    other, started = OtherLoad(), time.perf_counter()
    bandwidth = [copy_bandwidth(device) / 1e9]
    model = build_random_model(shape, device, dtype, max_seq_len, max_batch_size, seed)
    params = sum(p.numel() for p in model.parameters())  # counted before quantized layers make them buffers
    if scheme is not None:
        quantization.quantize_model(model, scheme)
    tokenizer = NoTextTokenizer(model.vocab_size)
    decode = CompiledDecodeStep(model) if compile else None
    engines = {p: Engine(model, tokenizer, prefill_chunk=prefill_chunk, max_prefill_tokens=max_prefill_tokens, policy=p,
                         decode=decode) for p in POLICIES}
    workload = make_workload(requests, prompt_range, gen_range, model.vocab_size, seed)
    # Untimed: compiles the decode step (every batch size and attended length is a dynamic size of one graph).
    drive(engines["continuous"], make_workload(2 * max_batch_size, prompt_range, gen_range, model.vocab_size, seed + 1))
    _progress("warm-up done")
    graphs = counters["stats"]["unique_graphs"]
    results = _describe(model, device, workload, prompt_range, gen_range, dict(
        shape=shape, max_batch_size=max_batch_size, max_seq_len=max_seq_len, compile=compile,
        prefill_chunk=engines["continuous"].prefill_chunk, max_prefill_tokens=max_prefill_tokens,
        repeats=repeats, seed=seed, quantize=scheme.name if scheme else None), params)
    results["decode_step_route"] = decode.routes if decode is not None else None
    results["offline"], tokens = _best_of(repeats, {p: (lambda p=p: drive(engines[p], workload)) for p in POLICIES}, max_batch_size)
    results["static_tokens_equal"] = tokens_equal_share(tokens["static"], tokens["continuous"])
    write_json(partial_json, results)
    if arrival_rate:
        arriving = make_workload(requests, prompt_range, gen_range, model.vocab_size, seed, arrival_rate)
        runs = {p: (lambda p=p: drive(engines[p], arriving)) for p in POLICIES}
        results["poisson"] = {"arrival_rate": arrival_rate, **_best_of(repeats, runs, max_batch_size)[0]}
        write_json(partial_json, results)
    results["speedup_continuous_over_static"] = {mode: results[mode]["continuous"]["throughput_tok_s"] / results[mode][
        "static"]["throughput_tok_s"] for mode in ("offline", "poisson") if mode in results}
    if compare_hf:
        _compare_hf(results, model, workload, tokens["continuous"], device)
        write_json(partial_json, results)
    results["join"] = {"prompt_len": join_prompt_len, "short_prompt_len": prompt_min, "chunks": [
        long_prompt_joins(model, tokenizer, decode, c, join_prompt_len, prompt_min, seed) for c in chunks]}
    results["graphs_compiled_during_timed_runs"] = counters["stats"]["unique_graphs"] - graphs
    if load_start is not None:
        results["load_average_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    # Other work on the machine slows every figure (on a CPU, badly: threads wait for each other).
    results["run_wall_s"], results["other_processes_cpu_s"] = time.perf_counter() - started, other.seconds()
    results["copy_bandwidth_gbs_start_end"] = bandwidth + [copy_bandwidth(device) / 1e9]
    return results


def _ms_pair(summary: dict, name: str) -> str:
    return f"{summary[name + '_p50_s'] * 1e3:.0f} / {summary[name + '_p99_s'] * 1e3:.0f}"


def _policy_rows(title: str, runs: dict, hf: Optional[dict]) -> List[str]:
    """One block of the table: each figure for continuous and static (and transformers' static batches)."""
    rows = [("throughput tok/s", lambda s: f"{s['throughput_tok_s']:.1f}"), ("TTFT p50 / p99 ms", lambda s: _ms_pair(s, "ttft")),
            ("ITL p50 / p99 ms", lambda s: _ms_pair(s, "itl")), ("mean slot occupancy", lambda s: f"{s['occupancy_mean']:.2f}"),
            ("wall s", lambda s: f"{s['wall_s']:.1f}")]
    c, st = runs["continuous"], runs["static"]
    lines = [title]
    for label, show in rows:
        line = f"  {label:24}{show(c):>16}{show(st):>16}"
        if label == "throughput tok/s":
            line += f"{c['throughput_tok_s'] / st['throughput_tok_s']:>13.2f}x"
        if hf is not None:
            line = f"{line:<72}{show(hf):>16}"
            if label == "throughput tok/s":
                line += f"{c['throughput_tok_s'] / hf['throughput_tok_s']:>11.2f}x"
        lines.append(line)
    return lines


def format_table(r: dict) -> str:
    """A readable summary of run()'s results."""
    w, hf = r["workload"], r.get("hf")
    lines = [
        f"llama.bench_serving: shape {r['shape']} ({r['params'] / 1e6:.1f}M parameters), {r['dtype']}"
        f"{', weights ' + r['quantize'] if r.get('quantize') else ''}, "
        f"device {r['device']}: {r['device_name']}",
        f"torch {r['torch']}, {r['max_batch_size']} slots, max_seq_len {r['max_seq_len']}, prefill chunk {r['prefill_chunk']} "
        f"({r['max_prefill_tokens']} with none generating), "
        f"{'compiled decode step, ' if r['compile'] else ''}greedy, EOS disabled, best of {r['repeats']}",
        f"workload: {w['requests']} requests, prompts {w['prompt_len'][0]}..{w['prompt_len'][1]} tokens ({w['prompt_tokens']} in all), "
        f"max_gen_len {w['max_gen_len'][0]}..{w['max_gen_len'][1]} ({w['gen_tokens']} in all), seed {r['seed']}",
    ]
    if r.get("decode_step_route"):
        lines.append(f"decode step compiled {r['decode_step_route']}")
    if "load_average_1min" in r:
        load = r["load_average_1min"]
        lines.append(f"1-minute load average {load['start']:.2f} at the start, {load['end']:.2f} at the end")
    lines.append("device copy bandwidth {:.1f} GB/s at the start, {:.1f} at the end (read + written)".format(
        *r["copy_bandwidth_gbs_start_end"]))
    if r.get("other_processes_cpu_s") is not None:
        share = r["other_processes_cpu_s"] / (r["run_wall_s"] * (os.cpu_count() or 1))
        lines.append(f"other processes used {r['other_processes_cpu_s']:.0f} CPU-seconds during the {r['run_wall_s']:.0f} s run "
                     f"({100 * share:.0f}% of the machine; more than a few % slows every figure)")
    if hf:
        lines.append(f"transformers {hf['transformers']} LlamaForCausalLM.generate (sdpa), same weights, "
                     f"static batches of {r['max_batch_size']} in arrival order, left-padded")
    header = f"\n{'':26}{'continuous':>16}{'static':>16}{'cont/static':>14}"
    lines.append(header + (f"{'HF static':>16}{'cont/HF':>12}" if hf else ""))
    lines += _policy_rows(f"offline: all {w['requests']} at once", r["offline"], hf["offline"] if hf else None)
    if "poisson" in r:
        lines += _policy_rows(f"Poisson arrivals, {r['poisson']['arrival_rate']:g} per second", r["poisson"], None)
    match = f"greedy tokens of static equal to continuous: {100 * r['static_tokens_equal']:.0f}%"
    lines.append(match + (f"; transformers' equal to continuous: {100 * hf['tokens_equal']:.0f}%" if hf else ""))
    j = r["join"]
    if j["chunks"]:
        running = j["chunks"][0]["running"]
        lines += ["", f"a {j['prompt_len']}-token prompt joins {running} running requests ({j['short_prompt_len']}-token prompts):",
                  f"  {'prefill chunk':>13}{'ITL p50 / p99 ms while it is read':>36}{'ITL p50 ms before':>20}{'its TTFT ms':>14}"]
        for c in j["chunks"]:
            lines.append(f"  {c['prefill_chunk']:>13}{_ms_pair(c, 'itl'):>36}{c['itl_before_p50_s'] * 1e3:>20.0f}"
                         f"{c['long_ttft_s'] * 1e3:>14.0f}")
    lines.append(f"decode-step graphs compiled during the timed runs: {r['graphs_compiled_during_timed_runs']}")
    return "\n".join(lines)


def main(shape: str = "134M", device: Optional[str] = None, dtype: Optional[str] = None, max_batch_size: int = 8,
         requests: int = 32, prompt_min: int = 16, prompt_max: int = 256, gen_min: int = 16, gen_max: int = 128,
         arrival_rate: Optional[float] = 1.0, prefill_chunk: Optional[int] = None, join_prompt_len: int = 2048,
         join_chunks=(128, 512), compare_hf: bool = False, compile: bool = False, repeats: int = 1, seed: int = 0,
         max_seq_len: Optional[int] = None, json: Optional[str] = None, quantize: Optional[str] = None,
         max_prefill_tokens: int = 8192) -> dict:
    """Serving benchmark on a random model: continuous against static batching on a mixed workload; prints a table
    and optionally writes JSON (every figure). See README.md, "Continuous batching", for every figure.

    Args:
        shape: The model's shape: tiny, 134M, 7B, 13B or 70B.
        device: cuda, cpu or mps; by default the best available.
        dtype: float32, float16 or bfloat16; by default the device's (float32 on the CPU).
        max_batch_size: The engine's slots (requests generated at once).
        requests: Requests in the workload.
        prompt_min: The shortest prompt, in tokens (prompt lengths are uniform from prompt_min to prompt_max).
        prompt_max: The longest prompt, in tokens.
        gen_min: The fewest tokens a request generates, at least 2.
        gen_max: The most tokens a request generates.
        arrival_rate: Requests per second of the Poisson-arrivals run; 0 for no such run.
        prefill_chunk: The most prompt tokens read in one engine step while requests generate, in the workload runs;
            by default the engine's (128 on CPU, 512 elsewhere).
        max_prefill_tokens: The most prompt tokens read in one engine step while no request generates.
        join_prompt_len: The long prompt's length in the join test (a long prompt joining running requests).
        join_chunks: Prefill chunk sizes the join test runs with, e.g. [128,512]; [] for no join test.
        compare_hf: Also run the workload through transformers' generate in static batches.
        compile: Generate through the torch.compile'd decode step.
        repeats: Rounds of every run; the fastest of each is reported.
        seed: Seeds the workload and the random weights.
        max_seq_len: The context the model is built for; by default the longest prompt and generation of any run.
        json: A file to write every figure to as JSON (also after each part of the run); its folder must exist.
        quantize: int8, w8a8 or int4[-gN] to serve the model with quantized weights (see llama/quantize.py); by
            default none. Not with compare_hf.
    """
    json = check_output_path(json)
    results = run(shape, device, dtype, max_batch_size, requests, prompt_min, prompt_max, gen_min, gen_max, arrival_rate,
                  prefill_chunk, join_prompt_len, join_chunks, compare_hf, compile, repeats, seed, max_seq_len, json, quantize,
                  max_prefill_tokens)
    report(format_table(results), results, json)
    return results


if __name__ == "__main__":
    from llama.cli import run as run_cli

    run_cli(main, serialize=lambda result: None)  # the table is the output, not the returned dict
