"""An OpenAI-compatible HTTP server on the continuous-batching engine, with Prometheus metrics and a chat page.

    python -m llama.server --ckpt_dir DIR --tokenizer_path FILE [--port 8000] [--api_key KEY]
    torchrun --nproc_per_node 2 -m llama.server --ckpt_dir DIR ...   (rank 0 serves; every rank steps)
    python -m llama.server --help
"""

import asyncio
import json
import logging
import os
import signal
import threading
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Callable, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llama import openai_api as api
from llama.checks import is_int
from llama.engine import check_prefill_options
from llama.request import StepOutput
from llama.serving import EngineLoop, QueueFull, ShuttingDown

logger = logging.getLogger("llama.server")


def create_app(loop: EngineLoop, tokenizer, model_name: str, api_key: Optional[str] = None, url: str = "") -> FastAPI:
    """The FastAPI app serving loop's engine as model_name; with api_key, /v1 needs "Authorization: Bearer <key>".
    On shutdown it stops the loop: running requests get 30 s to finish, then are aborted."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logger.info("serving %s at %s (OpenAI API under /v1, chat page at /); stop with SIGTERM to pid %d",
                    model_name, url, os.getpid())
        yield
        await asyncio.to_thread(loop.stop, 30.0)

    app = FastAPI(title="llama", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                error = api.APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                     type="authentication_error", code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.exception_handler(api.APIError)
    async def api_error(request: Request, error: api.APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(loop.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "llama"}]}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return (resources.files("llama") / "static" / "chat.html").read_text(encoding="utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = api.parse_completion(await _json(request), loop.engine, tokenizer, model_name)
        return await _respond(request, loop, parsed, "cmpl", _stream_chunks(tokenizer, chat=False), api.completion_choice, tokenizer)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        parsed = api.parse_chat(await _json(request), loop.engine, tokenizer, model_name)
        return await _respond(request, loop, parsed, "chatcmpl", _stream_chunks(tokenizer, chat=True), api.chat_choice, tokenizer)

    return app


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise api.APIError(400, f"the request body is not valid JSON: {e}") from e


async def _respond(request: Request, loop: EngineLoop, parsed: api.Parsed, prefix: str, stream_chunks: Callable,
                   make_choice: Callable, tokenizer):
    """Run the parsed request's choices; a JSON response, or server-sent events with stream."""
    events: asyncio.Queue = asyncio.Queue()
    aio = asyncio.get_running_loop()
    keys: List[int] = []
    try:
        for index, spec in enumerate(parsed.specs):
            if spec is not None:
                keys.append(loop.submit(spec, lambda out, i=index: aio.call_soon_threadsafe(events.put_nowait, (i, out))))
    except QueueFull as e:
        _abort(loop, keys)
        raise api.APIError(429, str(e), type="rate_limit_exceeded", code="queue_full") from e
    except ShuttingDown as e:
        _abort(loop, keys)
        raise api.APIError(503, str(e), type="server_error") from e
    meta = {"id": api.new_id(prefix), "created": parsed.created, "model": parsed.model}
    if parsed.stream:
        body = _events(loop, keys, parsed, events, stream_chunks, meta)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    done = await _gather(request, loop, keys, parsed, events)
    choices = [make_choice(parsed, tokenizer, i, c) for i, c in enumerate(done)]
    obj = "text_completion" if prefix == "cmpl" else "chat.completion"
    return {**meta, "object": obj, "choices": choices, "usage": api.usage(parsed, done)}


def _abort(loop: EngineLoop, keys: List[int]) -> None:
    for key in keys:
        loop.abort(key)


async def _gather(request: Request, loop: EngineLoop, keys: List[int], parsed: api.Parsed, events: asyncio.Queue):
    """Every choice's Completion (None for a refused dialog); aborts all if the client goes away."""
    done = [None] * len(parsed.specs)
    left = len(keys)
    try:
        while left:
            try:
                index, out = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise asyncio.CancelledError("client disconnected")
                continue
            if out.error is not None:
                raise api.APIError(500, f"the engine failed on this request: {out.error}", type="server_error")
            if out.finished:
                done[index], left = out.completion, left - 1
    except BaseException:
        _abort(loop, keys)
        raise
    return done


async def _events(loop: EngineLoop, keys: List[int], parsed: api.Parsed, events: asyncio.Queue,
                  stream_chunks: Callable, meta: dict) -> AsyncIterator[str]:
    """Server-sent events: the chunks of every choice as they come, the usage chunk, then [DONE]."""
    done = [None] * len(parsed.specs)
    left = len(keys)
    try:
        for index, spec in enumerate(parsed.specs):
            for chunk in stream_chunks(parsed, index, None, start=True):
                yield _sse(meta, chunk, parsed)
        while left:
            index, out = await events.get()
            if out.error is not None:
                error = api.APIError(500, f"the engine failed on this request: {out.error}", type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
                break
            for chunk in stream_chunks(parsed, index, out):
                yield _sse(meta, chunk, parsed)
            if out.finished:
                done[index], left = out.completion, left - 1
        else:
            if parsed.include_usage:
                yield _sse(meta, {"choices": [], "usage": api.usage(parsed, done)}, parsed, usage_chunk=True)
        yield "data: [DONE]\n\n"
    finally:
        _abort(loop, keys)  # finished keys are ignored; a client gone mid-stream frees its slots


def _sse(meta: dict, chunk: dict, parsed: api.Parsed, usage_chunk: bool = False) -> str:
    obj = "text_completion" if meta["id"].startswith("cmpl") else "chat.completion.chunk"
    payload = {**meta, "object": obj, **chunk}
    if parsed.include_usage and not usage_chunk:
        payload["usage"] = None
    return f"data: {json.dumps(payload)}\n\n"


def _stream_chunks(tokenizer, chat: bool) -> Callable:
    """chunks(parsed, index, out) -> the event payloads for choice index after out (start=True: before any output)."""
    token_logprobs = api.chat_logprobs if chat else api.completion_logprobs

    def opening(parsed: api.Parsed, index: int):
        if chat:
            yield {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            if parsed.specs[index] is None:  # refused: the reply chat_completion gives, at once
                yield {"delta": {"content": api.UNSAFE_ERROR}, "finish_reason": "stop"}
        elif parsed.echo:
            yield {"text": tokenizer.decode(parsed.prompts[index // parsed.n]), "finish_reason": None}

    generated = {}  # with echo: each choice's tokens until its text joins the prompt's

    def joined(parsed: api.Parsed, index: int, out: StepOutput) -> str:
        """out.text, with the space SentencePiece puts between the echoed prompt and the first generated word
        (decoded alone, the generated text loses it)."""
        if not parsed.echo or index not in generated:
            return out.text
        tokens = generated[index] = generated[index] + out.new_tokens
        if not out.text:
            return out.text
        del generated[index]
        prompt = parsed.prompts[index // parsed.n]
        after_prompt = tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)):]
        return " " + out.text if after_prompt.startswith(" ") and not out.text.startswith(" ") else out.text

    def chunks(parsed: api.Parsed, index: int, out: Optional[StepOutput], start: bool = False):
        if start:
            generated[index] = []
            for choice in opening(parsed, index):
                yield {"choices": [{"index": index, **choice, "logprobs": None}]}
            return
        text = joined(parsed, index, out)
        with_logprobs = parsed.logprobs is not None and bool(out.new_tokens)
        if not text and not out.finished and not with_logprobs:
            return
        logprobs = token_logprobs(tokenizer, out.new_tokens, out.logprobs, out.top_logprobs) if with_logprobs else None
        content = ({"delta": {"content": text} if text else {}} if chat else {"text": text})
        reason = api.finish_reason(out.finish_reason) if out.finished else None
        yield {"choices": [{"index": index, **content, "logprobs": logprobs, "finish_reason": reason}]}

    return chunks


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_len: int = 2048,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
    model_name: Optional[str] = None,
    api_key: Optional[str] = None,
    max_queue: int = 256,
    prefill_chunk: Optional[int] = None,
    max_prefill_tokens: int = 8192,
    log_level: str = "info",
) -> None:
    """Serve a checkpoint over OpenAI's API (/v1/completions, /v1/chat/completions, /v1/models), with a chat page at /
    and Prometheus metrics at /metrics.

    Args:
        ckpt_dir: The checkpoint folder (Meta's or Hugging Face's layout). Give it with --tokenizer_path, or neither
            to serve the bundled demo model.
        tokenizer_path: The tokenizer.model file (or the folder holding it).
        host: The address to listen on; 0.0.0.0 for every interface.
        port: The TCP port to listen on.
        max_batch_size: Requests generated at once (the KV cache's slots); more wait in a queue.
        max_seq_len: The most tokens of prompt and reply together for a request.
        device: cuda, cpu or mps; by default the best available.
        dtype: float32, float16 or bfloat16; by default bfloat16 (or float16) on a GPU, float32 on the CPU.
        compile: Generate through the torch.compile'd decode step (compiled at the first request).
        quantize: int8, w8a8 or int4[-gN] to serve quantized weights; by default none.
        model_name: The model's name in the API; by default the checkpoint folder's name.
        api_key: Require "Authorization: Bearer KEY" on /v1; by default the LLAMA_API_KEY environment variable,
            none when that is unset.
        max_queue: Requests that may wait beyond the free slots; one more gets HTTP 429.
        prefill_chunk: The most prompt tokens read in one engine step while requests generate (a long prompt takes
            several, and the running requests' next tokens wait on each); by default 128 on CPU, 512 on a GPU.
        max_prefill_tokens: The most prompt tokens read in one step while none generates (a burst's prompts are
            read at once); bounds the step's memory and length.
        log_level: uvicorn's and the server's log level: critical, error, warning, info, debug or trace.
    """
    check_server_options(port, max_queue, prefill_chunk, max_prefill_tokens, log_level)  # before the weights are read
    import uvicorn

    from llama import Llama
    from llama.demo import STOP_TOKEN_IDS, weights_or_demo
    from llama.distributed import global_rank, is_printing_rank

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(name)s: %(message)s")
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if not is_printing_rank():
        for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 ends the job: its close() ends follow()
            signal.signal(sig, signal.SIG_IGN)
    ckpt_dir, tokenizer_path, demo = weights_or_demo(ckpt_dir, tokenizer_path)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype,
                            compile=compile, quantize=quantize)
    engine = generator.engine
    if prefill_chunk is not None:
        engine.prefill_chunk = prefill_chunk
    engine.max_prefill_tokens = max_prefill_tokens
    if demo:
        engine.stop_token_ids = STOP_TOKEN_IDS
    if global_rank() != 0:
        engine.follow()
        return
    loop = EngineLoop(engine, max_queue=max_queue, heartbeat_s=5.0 if distributed else None)
    name = model_name or Path(ckpt_dir).resolve().name
    app = create_app(loop, generator.tokenizer, name, api_key or os.environ.get("LLAMA_API_KEY") or None,
                     url=f"http://{host}:{port}")
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
    if not serve(loop, config):
        raise OSError(f"could not serve on {host}:{port} (see the error above); choose another --port or --host")


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def check_server_options(port, max_queue, prefill_chunk, max_prefill_tokens, log_level) -> None:
    """ValueError naming the first of the server's options that is out of range."""
    if log_level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    if not is_int(port) or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be an integer from 0 to 65535, got {port!r}")
    if not is_int(max_queue) or int(max_queue) < 0:
        raise ValueError(f"max_queue must be an integer >= 0 (requests that may wait beyond the free slots), got {max_queue!r}")
    check_prefill_options(prefill_chunk, max_prefill_tokens)


def serve(loop: EngineLoop, config) -> bool:
    """Run uvicorn (config) in a thread and step loop's engine in this one, the main thread: on the CPU
    torch's kernels run slower in other threads. SIGTERM or SIGINT shut uvicorn down gracefully, which
    stops the loop. Returns whether uvicorn started listening."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextmanager
        def capture_signals(self):  # the main thread takes the signals (below); uvicorn re-raising them would exit -15
            yield

    server = Server(config)

    def http() -> None:
        try:
            server.run()
        finally:
            loop.request_stop()  # uvicorn failed to start, or has shut down (and stopped the loop)

    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="llama-http")
    try:
        thread.start()
        loop.run()
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return server.started


if __name__ == "__main__":
    from llama.cli import run

    run(main)
