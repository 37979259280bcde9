"""HTTP serving benchmark: the serving benchmark's mixed workload sent to an OpenAI-compatible server.

    python -m llama.bench_http --url http://127.0.0.1:8000 --concurrency 16          # a running server
    python -m llama.bench_http --shape 134M --device cpu --dtype float32 --max_batch_size 8 --concurrency 16

The workload is llama.bench_serving's (llama.workload.make_workload: --requests requests of random token ids,
prompt lengths uniform in [prompt_min, prompt_max], max_tokens uniform in [gen_min, gen_max], seeded), sent
as streaming completions (token-id prompts, temperature 0) through httpx.AsyncClient, either
--concurrency at a time (closed loop: a client sends its next request when its reply ends) or, with
--arrival_rate, as a Poisson process of that many requests/s (open loop). Per request, the time of
every streamed chunk that carries text is recorded. Reported: throughput (completion tokens from the
usage chunk over the wall time), time to first token (request sent to first text chunk) and the
inter-chunk latency (the gap between consecutive text chunks: one token per chunk, except where a
tokenizer holds back text, such as part of a multi-byte character), p50 and p99.

Without --url, a server on a random model of --shape is started in this process (llama.server's
FastAPI app in uvicorn in a thread, its EngineLoop stepping in the main thread as in the server; the
client runs in a child process, as a client would, not competing for this process's GIL), and the same workload also runs directly on an engine
over the same model (the same concurrency limit or arrival times, stepped in this thread), the two
taking turns: HTTP throughput as a share of the engine's own. Its stand-in tokenizer never emits EOS,
so every request generates exactly its max_tokens, and its text is the token ids, which are compared
with the engine's. Also reported: the time the engine spent in its steps and the steps taken in each
run, and the CPU time of the engine loop, torch's other threads, uvicorn and the client process.
"""

import multiprocessing
import os
import socket
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import List, Optional

import torch

from llama import bench_serving as bs
from llama.compiled import CompiledDecodeStep
from llama.device import resolve_device, resolve_dtype
from llama.engine import Engine
from llama.http_workload import run_http, server_model
from llama.measure import check_output_path, cpu_split, device_name, report, thread_cpu_s, tokens_equal_share
from llama.random_model import NoTextTokenizer, build_random_model
from llama.workload import Request, drive, make_workload, summarize


class TimedEngine(Engine):
    """An Engine that adds up its steps and the time spent in them (whichever thread steps it)."""

    steps, busy_s = 0, 0.0

    def step(self):
        start = time.perf_counter()
        try:
            return super().step()
        finally:
            self.steps, self.busy_s = self.steps + 1, self.busy_s + time.perf_counter() - start


# A server in this process -------------------------------------------------------------------------------


class InProcessServer:
    """llama.server's app over an EngineLoop on engine, served by uvicorn in a thread on 127.0.0.1; the engine
    steps in the main thread, as in llama.server, while serve_until() waits for a client."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, max_queue: int, api_key: Optional[str] = None):
        import uvicorn

        from llama.server import create_app
        from llama.serving import EngineLoop

        self.loop = EngineLoop(engine, max_queue=max_queue)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        app = create_app(self.loop, tokenizer, model_name, api_key)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)

    def serve_until(self, client: Future):
        """Step the engine in this thread until client (a future) is done; its result."""
        self.loop.run(until=client)
        return client.result()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.loop.request_stop()
        self.loop.run()


# The benchmark -----------------------------------------------------------------------------------------


def _check(concurrency, arrival_rate) -> Optional[int]:
    """The concurrency limit (None with an arrival rate), or ValueError."""
    if arrival_rate is not None and arrival_rate != 0:
        if isinstance(arrival_rate, bool) or not isinstance(arrival_rate, (int, float)) or arrival_rate < 0:
            raise ValueError(f"arrival_rate must be a number > 0 (or none: --concurrency), got {arrival_rate!r}")
        return None
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    return concurrency


def _keep_best(best: dict, name: str, summary: dict, *extra) -> None:
    best.setdefault("walls_s", {}).setdefault(name, []).append(summary["wall_s"])
    if name not in best or summary["wall_s"] < best[name][0]["wall_s"]:
        best[name] = (summary, *extra)


def _http_only(summary: dict, walls: List[float]) -> dict:
    """An HTTP summary without the engine's step figures, which a client cannot see."""
    return {**{k: v for k, v in summary.items() if k not in ("steps", "occupancy_mean")}, "walls_s": walls}


def _run_url(url: str, model: Optional[str], api_key: Optional[str], vocab_size: int, workload: List[Request],
             warm: List[Request], limit: Optional[int], repeats: int) -> dict:
    found = server_model(url, api_key)  # checks the server is there before anything is timed
    model = model or found
    # Untimed first, as for the server in this process: a server that compiles on its first requests is warm.
    run_http(url, model, warm, min(limit or len(warm), len(warm)), 1, api_key)
    best: dict = {}
    for _ in range(repeats):
        _keep_best(best, "http", run_http(url, model, workload, limit, 1, api_key)[0])
    return {"url": url, "model": model, "vocab_size": vocab_size, "http": _http_only(best["http"][0], best["walls_s"]["http"])}


def _run_in_process(net, workload: List[Request], warm: List[Request], limit: Optional[int], repeats: int, name: str,
                    decode, **prefill) -> dict:
    """A server on net in this process, and an engine driven directly, taking turns on the workload (after the
    warm workload, untimed, through HTTP)."""
    slots = net.cache_shape[0]
    tokenizer = NoTextTokenizer(net.vocab_size)
    served = TimedEngine(net, tokenizer, decode=decode, **prefill)
    server = InProcessServer(served, tokenizer, name, max_queue=max(256, len(workload)))
    direct = TimedEngine(net, tokenizer, decode=decode, **prefill)  # steps only while the server idles
    # The threads whose CPU time is reported: uvicorn's, and the main one, which steps the engine.
    threads = {"http_server": server.thread.native_id, "engine_loop": threading.main_thread().native_id}
    # The client runs in a process of its own, as clients do: in this one it would hold the GIL the server needs.
    client = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def measured(engine: TimedEngine, threads: dict, go) -> tuple:
        """go()'s result, and what the engine and the threads did meanwhile: steps, time in them, CPU time."""
        steps, busy, cpu = engine.steps, engine.busy_s, thread_cpu_s()
        result = go()
        return result, {"engine_steps": engine.steps - steps, "engine_busy_s": engine.busy_s - busy,
                        "cpu_s": cpu_split(cpu, thread_cpu_s(), threads)}

    best: dict = {}
    try:
        server.serve_until(client.submit(run_http, server.url, name, warm, min(limit or slots, len(warm)), slots))
        for _ in range(repeats):  # the two take turns
            send = lambda: server.serve_until(client.submit(run_http, server.url, name, workload, limit, slots))  # noqa: E731
            (summary, replies), seen = measured(served, threads, send)
            _keep_best(best, "http", {**summary, **seen}, replies)
            run_direct = (lambda: drive(direct, workload, concurrency=limit)) if limit else (lambda: drive(direct, workload))
            trace, seen = measured(direct, {"engine": threading.main_thread().native_id}, run_direct)
            _keep_best(best, "engine", {**summarize(trace, slots), **seen}, trace.tokens)
    finally:
        client.shutdown()
        server.stop()
    (http, replies), (engine, engine_tokens) = best["http"], best["engine"]
    http_tokens = [[int(t) for t in r.text.split()] for r in replies]  # the stand-in tokenizer's text: the ids
    return {
        "http": {**_http_only(http, best["walls_s"]["http"]), "chunks": sum(len(r.chunk_times) for r in replies)},
        "engine": {**engine, "walls_s": best["walls_s"]["engine"]},
        "http_over_engine_throughput": http["throughput_tok_s"] / engine["throughput_tok_s"],
        "prefill_chunk": served.prefill_chunk, "max_prefill_tokens": served.max_prefill_tokens,
        "usage_equals_ids_streamed": all(len(t) == r.completion_tokens for t, r in zip(http_tokens, replies)),
        "tokens_equal": tokens_equal_share(http_tokens, engine_tokens),
    }


def run(url: Optional[str] = None, shape: str = "134M", device: Optional[str] = None, dtype: Optional[str] = None,
        max_batch_size: int = 8, compile: bool = False, requests: int = 32, concurrency: int = 16,
        arrival_rate: Optional[float] = None, prompt_min: int = 16, prompt_max: int = 256, gen_min: int = 16,
        gen_max: int = 128, seed: int = 0, model: Optional[str] = None, api_key: Optional[str] = None,
        vocab_size: int = 32000, prefill_chunk: Optional[int] = None, repeats: int = 1,
        max_prefill_tokens: int = 8192) -> dict:
    """Run the HTTP benchmark and return its results (see main for the arguments)."""
    limit = _check(concurrency, arrival_rate)
    prompt_range, gen_range = (prompt_min, prompt_max), (gen_min, gen_max)
    bs._check_args(max_batch_size, requests, prompt_range, gen_range, prefill_chunk, 1, (), repeats, arrival_rate or None,
                   seed=seed, max_prefill_tokens=max_prefill_tokens)
    mode = {"concurrency": limit} if limit else {"arrival_rate": arrival_rate}
    settings = dict(requests=requests, prompt_len=list(prompt_range), max_tokens=list(gen_range), seed=seed,
                    repeats=repeats, **mode)
    rate = None if limit else arrival_rate
    if url is not None:  # a server elsewhere: HTTP figures only
        workload = make_workload(requests, prompt_range, gen_range, vocab_size, seed, rate)
        warm = make_workload(2 * max_batch_size, prompt_range, gen_range, vocab_size, seed + 1)
        api_key = api_key or os.environ.get("LLAMA_API_KEY") or None
        return {**settings, **_run_url(url.rstrip("/"), model, api_key, vocab_size, workload, warm, limit, repeats)}
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    net = build_random_model(shape, device, dtype, prompt_max + gen_max, max_batch_size, seed)
    workload = make_workload(requests, prompt_range, gen_range, net.vocab_size, seed, rate)
    decode = CompiledDecodeStep(net) if compile else None
    # Untimed first: the HTTP stack and (with --compile) the decode step warm up on another workload.
    warm = make_workload(2 * max_batch_size, prompt_range, gen_range, net.vocab_size, seed + 1)
    results = _run_in_process(net, workload, warm, limit, repeats, f"random-{shape}", decode, prefill_chunk=prefill_chunk,
                              max_prefill_tokens=max_prefill_tokens)
    return {
        **settings, "shape": shape, "params": sum(p.numel() for p in net.parameters()), "device": str(device),
        "device_name": device_name(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "max_batch_size": max_batch_size, "compile": compile,
        "gen_tokens": sum(r.max_gen_len for r in workload), **results,
        "decode_step_route": decode.routes if decode is not None else None,
        "load_average_1min": None if load_start is None else {"start": load_start, "end": os.getloadavg()[0]},
    }


def _ms(s: dict, name: str) -> str:
    return f"{s[name + '_p50_s'] * 1e3:.0f} / {s[name + '_p99_s'] * 1e3:.0f}"


def format_table(r: dict) -> str:
    """A readable summary of run()'s results."""
    mode = (f"{r['concurrency']} concurrent clients" if "concurrency" in r
            else f"Poisson arrivals, {r['arrival_rate']:g} requests/s")
    if "url" in r:
        head = [f"llama.bench_http: {r['url']}, model {r['model']}"]
    else:
        head = [f"llama.bench_http: in-process server, shape {r['shape']} ({r['params'] / 1e6:.1f}M parameters), "
                f"{r['dtype']}, device {r['device']}: {r['device_name']}",
                f"torch {r['torch']}, {r['max_batch_size']} slots, prefill chunk {r['prefill_chunk']} "
                f"({r['max_prefill_tokens']} with none generating), "
                f"{'compiled decode step, ' if r['compile'] else ''}greedy, EOS disabled, best of {r['repeats']}"]
        if r.get("decode_step_route"):
            head.append(f"decode step compiled {r['decode_step_route']}")
        if r["load_average_1min"]:
            load = r["load_average_1min"]
            head.append(f"1-minute load average {load['start']:.2f} at the start, {load['end']:.2f} at the end")
    head.append(f"workload: {r['requests']} streamed completions, prompts {r['prompt_len'][0]}..{r['prompt_len'][1]} tokens, "
                f"max_tokens {r['max_tokens'][0]}..{r['max_tokens'][1]}, seed {r['seed']}; {mode}")
    columns = [("HTTP", r["http"])] + ([("engine", r["engine"])] if "engine" in r else [])
    rows = [("throughput tok/s", lambda s: f"{s['throughput_tok_s']:.1f}"), ("TTFT p50 / p99 ms", lambda s: _ms(s, "ttft")),
            ("ITL p50 / p99 ms", lambda s: _ms(s, "itl")), ("generated tokens", lambda s: str(s["generated_tokens"])),
            ("wall s", lambda s: f"{s['wall_s']:.1f}")]
    lines = head + ["", f"{'':22}" + "".join(f"{name:>14}" for name, _ in columns)]
    lines += [f"{label:22}" + "".join(f"{show(s):>14}" for _, s in columns) for label, show in rows]
    if "engine" in r:
        lines += ["", f"HTTP throughput: {100 * r['http_over_engine_throughput']:.1f}% of the engine's own",
                  f"greedy tokens over HTTP equal to the engine's: {100 * r['tokens_equal']:.0f}%"]
        h, e = r["http"], r["engine"]
        lines.append(f"time in engine steps: {100 * h['engine_busy_s'] / h['wall_s']:.1f}% of the HTTP run "
                     f"({h['engine_steps']} steps, {1e3 * h['engine_busy_s'] / h['engine_steps']:.1f} ms each), "
                     f"{100 * e['engine_busy_s'] / e['wall_s']:.1f}% of the engine's ({e['engine_steps']} steps, "
                     f"{1e3 * e['engine_busy_s'] / e['engine_steps']:.1f} ms each)")
        cpu = h.get("cpu_s")
        if cpu:
            lines.append(f"CPU s in the HTTP run: engine loop {cpu['engine_loop']:.1f}, torch's other threads "
                         f"{cpu['other_threads']:.1f}, uvicorn {cpu['http_server']:.2f}, the client process "
                         f"{h['client_cpu_s']:.2f}; in the engine run: {sum(e['cpu_s'].values()):.1f}")
    return "\n".join(lines)


def main(url: Optional[str] = None, shape: str = "134M", device: Optional[str] = None, dtype: Optional[str] = None,
         max_batch_size: int = 8, compile: bool = False, requests: int = 32, concurrency: int = 16,
         arrival_rate: Optional[float] = None, prompt_min: int = 16, prompt_max: int = 256, gen_min: int = 16,
         gen_max: int = 128, seed: int = 0, model: Optional[str] = None, api_key: Optional[str] = None,
         vocab_size: int = 32000, prefill_chunk: Optional[int] = None, repeats: int = 1, json: Optional[str] = None,
         max_prefill_tokens: int = 8192) -> dict:
    """HTTP serving benchmark: llama.bench_serving's workload sent to /v1/completions; prints a table and optionally
    writes JSON.

    Args:
        url: A running server's address, e.g. http://127.0.0.1:8000; without it a server on a random model is started
            in this process and the workload also runs directly on the engine, for comparison.
        shape: In process: the random model's shape, tiny, 134M, 7B, 13B or 70B.
        device: In process: cuda, cpu or mps; by default the best available.
        dtype: In process: float32, float16 or bfloat16; by default the device's (float32 on the CPU).
        max_batch_size: In process: the engine's slots (requests generated at once). Both ways, an untimed warm-up of
            2 * max_batch_size requests (another seed) runs first.
        compile: In process: generate through the torch.compile'd decode step.
        requests: Requests in the workload.
        concurrency: Requests in flight at once (each sent when another ends).
        arrival_rate: Requests per second of a Poisson process instead of --concurrency (no limit in flight).
        prompt_min: The shortest prompt, in tokens (prompt lengths are uniform from prompt_min to prompt_max).
        prompt_max: The longest prompt, in tokens.
        gen_min: The fewest tokens a request asks for (max_tokens), at least 2.
        gen_max: The most tokens a request asks for.
        seed: Seeds the workload (and in process the random weights).
        model: With --url: the model name to ask for; by default the first of the server's /v1/models.
        api_key: With --url: the server's API key; by default the LLAMA_API_KEY environment variable.
        vocab_size: With --url: the random prompts' token ids are below it (32000 is Llama 2's vocabulary).
        prefill_chunk: In process: the most prompt tokens read in one engine step while requests generate; by
            default the engine's (128 on CPU, 512 elsewhere).
        max_prefill_tokens: In process: the most prompt tokens read in one engine step while no request generates.
        repeats: Runs; the fastest is reported.
        json: A file to write every figure to as JSON; its folder must exist.
    """
    json = check_output_path(json)
    results = run(url, shape, device, dtype, max_batch_size, compile, requests, concurrency, arrival_rate, prompt_min,
                  prompt_max, gen_min, gen_max, seed, model, api_key, vocab_size, prefill_chunk, repeats, max_prefill_tokens)
    report(format_table(results), results, json)
    return results


if __name__ == "__main__":
    from llama.cli import run as run_cli

    run_cli(main, serialize=lambda result: None)  # the table is the output, not the returned dict
