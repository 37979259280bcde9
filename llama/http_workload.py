"""The serving workload (llama.workload) sent to an OpenAI-compatible server: streamed completions of token-id
prompts through httpx, a fixed number in flight or each at its arrival time, with the time of every text chunk
recorded, summarised as llama.workload summarises a run on the engine. Used by llama.bench_http."""

import asyncio
import json
import time
from dataclasses import dataclass
from typing import List, Optional

from llama.workload import Request, Trace, summarize


@dataclass
class Reply:
    """One request's reply as the client saw it: times in seconds after the run's start."""

    sent: float
    chunk_times: List[float]
    text: str
    completion_tokens: int


async def _stream_one(client, model: str, request: Request, start: float) -> Reply:
    # ignore_eos (vLLM's extension, which llama.server and llama.cpp's server take too): every request generates
    # its max_tokens on any server, whatever its tokenizer, as the workload says.
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_gen_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter() - start
    times, pieces, usage = [], [], None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {(await response.aread()).decode()[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the server failed the request: {chunk['error'].get('message')}")
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            text = "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if text:
                times.append(time.perf_counter() - start)
                pieces.append(text)
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk (stream_options.include_usage)")
    return Reply(sent, times, "".join(pieces), usage)


async def _send_all(url: str, model: str, workload: List[Request], concurrency: Optional[int],
                    headers: dict) -> tuple:
    """Every request of workload: concurrency at a time, or (None) each at its arrival time. Returns the
    replies in workload order and the wall time from the start to the end of the last reply."""
    import httpx

    width = concurrency or len(workload)
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    replies: List[Optional[Reply]] = [None] * len(workload)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        gate = asyncio.Semaphore(width)
        start = time.perf_counter()

        async def one(i: int) -> None:
            if concurrency is None:
                await asyncio.sleep(max(0.0, workload[i].arrival - (time.perf_counter() - start)))
            async with gate:
                replies[i] = await _stream_one(client, model, workload[i], start)

        await asyncio.gather(*(one(i) for i in range(len(workload))))
        wall = time.perf_counter() - start
    return replies, wall


def http_trace(replies: List[Reply], wall: float, tokens: Optional[List[List[int]]] = None) -> Trace:
    """The replies as a llama.workload Trace, for its summarize(): arrivals are the send times, token times
    the text chunks' times, and tokens the ids when known (else usage's count of stand-ins, -1)."""
    trace = Trace([r.sent for r in replies])
    trace.token_times = [r.chunk_times for r in replies]
    trace.tokens = tokens if tokens is not None else [[-1] * r.completion_tokens for r in replies]
    trace.wall_s = wall
    return trace


def run_http(url: str, model: str, workload: List[Request], concurrency: Optional[int], slots: int,
             api_key: Optional[str] = None) -> tuple:
    """Send the workload; its summary (as llama.workload's summarize, with the CPU time this process spent)
    and the replies."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    cpu = time.process_time()
    replies, wall = asyncio.run(_send_all(url, model, workload, concurrency, headers))
    return {**summarize(http_trace(replies, wall), slots), "client_cpu_s": time.process_time() - cpu}, replies


def server_model(url: str, api_key: Optional[str]) -> str:
    """The first model of url's /v1/models; ValueError for an address that is not http(s), OSError naming url where
    the server cannot be reached or refuses (with what to do)."""
    import httpx

    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https://, got {url!r}")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    except httpx.TransportError as error:
        raise OSError(f"cannot reach the server at {url} ({error}); start it first, or check --url") from error
    if response.status_code == 401:
        raise OSError(f"the server at {url} wants an API key: pass --api_key or set LLAMA_API_KEY")
    if response.status_code != 200:
        raise OSError(f"{url}/v1/models answered HTTP {response.status_code}; is --url an OpenAI-compatible server?")
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise OSError(f"{url}/v1/models did not list a model; pass --model") from error
