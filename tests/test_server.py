"""python -m llama.server as a real process on 127.0.0.1, driven by the official openai client and raw HTTP."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the server-test extra: pip install -e '.[server-test]'")
httpx = pytest.importorskip("httpx")

from tests.conftest import REPO  # noqa: E402

MAX_SEQ_LEN = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process; stop() sends SIGTERM and returns its exit code."""

    def __init__(self, ckpt_dir, tokenizer_path, nproc: int = 0, max_seq_len: int = MAX_SEQ_LEN, **flags):
        self.port, self.nproc = free_port(), nproc
        self.url = f"http://127.0.0.1:{self.port}"
        weights = [] if ckpt_dir is None else ["--ckpt_dir", str(ckpt_dir), "--tokenizer_path", str(tokenizer_path)]
        args = ["-m", "llama.server", *weights, "--port", str(self.port), "--device", "cpu", "--max_seq_len", str(max_seq_len), "--log_level", "warning"]
        for key, value in flags.items():
            args += [f"--{key}", str(value)]
        launcher = [sys.executable]
        if nproc:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LLAMA_API_KEY")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(launcher + args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.proc.stdout.read()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("the server did not answer /health within 120 s")

    def client(self, **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
        raise KeyError(name)

    def serving_pid(self) -> int:
        """The process that serves HTTP: the server itself, or torchrun's rank-0 worker."""
        if not self.nproc:
            return self.proc.pid
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except (OSError, ValueError):
                continue
            if ppid == self.proc.pid and b"RANK=0" in environ:
                return int(entry)
        raise RuntimeError("torchrun's rank-0 worker not found")

    def stop(self) -> int:
        """SIGTERM to the serving process (under torchrun, rank 0 ends the other ranks); the launcher's exit code."""
        if self.proc.poll() is None:
            os.kill(self.serving_pid(), signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def stories_server(stories260k):
    server = Server(stories260k, stories260k / "tokenizer.model", max_batch_size=4)
    yield server
    assert server.stop() == 0, server.proc.stdout.read()[-3000:]


@pytest.fixture(scope="module")
def tokenizer(stories260k):
    from llama.tokenizer import Tokenizer

    return Tokenizer(str(stories260k / "tokenizer.model"))


def test_models_health_and_metrics(stories_server):
    models = stories_server.client().models.list()
    assert [m.id for m in models.data] == ["stories260K"]
    assert httpx.get(stories_server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(stories_server.url + "/metrics").text
    for name in ("llama_requests_running", "llama_requests_waiting", "llama_kv_slots_in_use", "llama_prompt_tokens_total",
                 "llama_generation_tokens_total", "llama_time_to_first_token_seconds_bucket",
                 "llama_inter_token_latency_seconds_bucket"):
        assert name in text, name


def test_completion_is_the_librarys_greedy_text_with_exact_usage(stories_server, tokenizer):
    client = stories_server.client()
    out = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=20, temperature=0)
    choice = out.choices[0]
    assert choice.text.startswith(", there was a little girl named Lily")
    assert choice.finish_reason == "length" and out.object == "text_completion" and out.id.startswith("cmpl-")
    prompt_tokens = len(tokenizer.encode("Once upon a time", bos=True, eos=False))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (prompt_tokens, 20, prompt_tokens + 20)
    # Token ids as the prompt, and echo: the prompt's text comes first.
    ids = tokenizer.encode("Once upon a time", bos=True, eos=False)
    echoed = client.completions.create(model="stories260K", prompt=ids, max_tokens=20, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + choice.text


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_streamed_text_equals_the_non_streamed_text_for_the_same_seed(stories_server, kind):
    client = stories_server.client()
    settings = dict(model="stories260K", max_tokens=40, temperature=0.9, top_p=0.95, seed=11)
    if kind == "completions":
        whole = client.completions.create(prompt="Tom had a big dog", **settings)
        chunks = list(client.completions.create(prompt="Tom had a big dog", stream=True,
                                                stream_options={"include_usage": True}, **settings))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = whole.choices[0].text
    else:
        messages = [{"role": "user", "content": "Tell me a story about a cat."}]
        whole = client.chat.completions.create(messages=messages, **settings)
        chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **settings))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expected = whole.choices[0].message.content
    assert text == expected and text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_echo_streams_the_same_text_as_without_streaming(stories_server):
    client = stories_server.client()
    settings = dict(model="stories260K", prompt="Once upon", max_tokens=12, temperature=0, echo=True)
    whole = client.completions.create(**settings).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **settings))
    assert streamed == whole and whole.startswith("Once upon a time")


def test_n_choices_logprobs_and_stop(stories_server, tokenizer):
    client = stories_server.client()
    out = client.completions.create(model="stories260K", prompt="One day", max_tokens=15, temperature=1.0, seed=3, n=3)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1  # each choice has its own seed
    assert out.usage.completion_tokens == sum(len(tokenizer.encode(c.text, False, False)) for c in out.choices) or \
        out.usage.completion_tokens <= 45
    lp = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(x <= 0 for x in logprobs.token_logprobs)
    assert "".join(logprobs.tokens).strip() == lp.choices[0].text.strip()
    chat = client.chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 5 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    stopped = client.completions.create(model="stories260K", prompt="Once upon a time", max_tokens=30, temperature=0, stop=["Lily"])
    assert stopped.choices[0].text == ", there was a little girl named " and stopped.choices[0].finish_reason == "stop"


def test_a_dialog_with_special_tags_gets_the_librarys_refusal(stories_server):
    out = stories_server.client().chat.completions.create(
        model="stories260K", messages=[{"role": "user", "content": "[INST] hi"}], max_tokens=5)
    assert out.choices[0].message.content == "Error: special tags are not allowed as part of the prompt."
    assert out.usage.completion_tokens == 0


def test_the_same_seed_alone_or_among_16_concurrent_requests(stories_server):
    settings = dict(model="stories260K", max_tokens=30, temperature=0.8, seed=42)
    alone = stories_server.client().completions.create(prompt="Lily saw a bird", **settings).choices[0].text

    async def crowd():
        client = openai.AsyncOpenAI(base_url=stories_server.url + "/v1", api_key="none", max_retries=0)
        prompts = ["Lily saw a bird" if i == 7 else f"Story number {i}:" for i in range(16)]
        outs = await asyncio.gather(*(client.completions.create(prompt=p, **{**settings, "seed": 42 if i == 7 else i})
                                      for i, p in enumerate(prompts)))
        return outs[7].choices[0].text

    assert asyncio.run(crowd()) == alone


def test_context_boundary(stories_server, tokenizer):
    client = stories_server.client()
    fits = [1] + [300] * (MAX_SEQ_LEN - 2)  # max_seq_len - 1 tokens: room for exactly one
    out = client.completions.create(model="stories260K", prompt=fits, max_tokens=1, temperature=0)
    assert out.usage.completion_tokens <= 1 and out.usage.prompt_tokens == MAX_SEQ_LEN - 1
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="stories260K", prompt=fits + [300], max_tokens=1)
    assert "128 tokens" in str(error.value) and "context of 128" in str(error.value)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="stories260K", prompt=fits[:100], max_tokens=50)
    assert "100 tokens" in str(error.value) and "max_tokens is 50" in str(error.value)


def test_64_concurrent_clients_are_each_answered_once(stories_server):
    async def load():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=stories_server.url, timeout=120, limits=limits) as client:
            async def one(i):
                r = await client.post("/v1/completions", json={"model": "stories260K", "prompt": f"Request {i} was",
                                                               "max_tokens": 4 + i % 5, "temperature": 0, "user": str(i)})
                return i, r.status_code, r.json()

            return await asyncio.gather(*(one(i) for i in range(64)))

    results = asyncio.run(load())
    assert [r[1] for r in results] == [200] * 64
    assert len({r[2]["id"] for r in results}) == 64
    assert all(r[2]["usage"]["completion_tokens"] <= 4 + r[0] % 5 for r in results)


def test_mass_cancellation_frees_every_slot(stories_server):
    async def cut():
        async with httpx.AsyncClient(base_url=stories_server.url, timeout=60) as client:
            async def one(i):
                body = {"model": "stories260K", "prompt": f"Tale {i}", "max_tokens": 110, "stream": i % 2 == 0}
                if body["stream"]:
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        async for _ in r.aiter_lines():
                            pass
                else:
                    await client.post("/v1/completions", json=body)

            async def with_deadline(i):  # the client gives up after 0.4 s: its connection closes mid-request
                try:
                    await asyncio.wait_for(one(i), timeout=0.4)
                except asyncio.TimeoutError:
                    return "cut"
                return "done"

            return await asyncio.gather(*(with_deadline(i) for i in range(32)))

    outcomes = asyncio.run(cut())
    assert outcomes.count("cut") >= 24  # 32 requests of 110 tokens on 4 slots cannot finish in 0.4 s
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (stories_server.metric("llama_requests_running") or stories_server.metric("llama_requests_waiting")):
        time.sleep(0.1)
    assert stories_server.metric("llama_requests_running") == 0 and stories_server.metric("llama_requests_waiting") == 0
    start = time.monotonic()
    out = stories_server.client().completions.create(model="stories260K", prompt="Once", max_tokens=3, temperature=0)
    assert time.monotonic() - start < 2 and out.choices[0].text


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", "JSON"),
    ("/v1/completions", b"[1, 2]", "JSON object"),
    ("/v1/completions", {"prompt": "hi"}, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, "does not exist"),
    ("/v1/completions", {"model": "stories260K"}, "prompt"),
    ("/v1/completions", {"model": "stories260K", "prompt": ""}, "empty"),
    ("/v1/completions", {"model": "stories260K", "prompt": []}, "prompt"),
    ("/v1/completions", {"model": "stories260K", "prompt": [1, 99999]}, "outside the vocabulary"),
    ("/v1/completions", {"model": "stories260K", "prompt": [1, -3]}, "outside the vocabulary"),
    ("/v1/completions", {"model": "stories260K", "prompt": 5}, "prompt"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "max_tokens": 1000}, "context"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "n": 0}, "'n'"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "ignore_eos": "yes"}, "'ignore_eos'"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "n": 1000}, "'n'"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "seed": 1.5}, "seed"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "frequency_penalty": 3}, "frequency_penalty"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "presence_penalty": "x"}, "presence_penalty"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "top_k": 0}, "top_k"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"model": "stories260K", "prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"model": "stories260K"}, "messages"),
    ("/v1/chat/completions", {"model": "stories260K", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "stories260K", "messages": [{"role": "robot", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"model": "stories260K", "messages": [{"role": "user"}]}, "content"),
    ("/v1/chat/completions", {"model": "stories260K", "messages": [{"role": "assistant", "content": "x"}]}, "user"),
    ("/v1/chat/completions", {"model": "stories260K", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"model": "stories260K", "messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"model": "stories260K", "messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
]


@pytest.mark.parametrize("path,body,match", BAD_REQUESTS, ids=[f"{i}-{m}" for i, (_, _, m) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_400_in_openais_error_shape(stories_server, path, body, match):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(stories_server.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert match.lower() in error["message"].lower(), error["message"]


def test_the_server_still_serves_after_the_bad_requests(stories_server):
    out = stories_server.client().completions.create(model="stories260K", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert out.choices[0].text.startswith(", there was")
    assert stories_server.metric("llama_requests_running") == 0


def test_api_key_and_a_full_queue(tiny_checkpoints, tiny_tokenizer_path):
    server = Server(tiny_checkpoints[(2, 1)], tiny_tokenizer_path, max_batch_size=1, max_queue=1, api_key="s3cret",
                    model_name="tiny")
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        client = server.client(api_key="s3cret")
        assert [m.id for m in client.models.list().data] == ["tiny"]

        async def flood():
            async with httpx.AsyncClient(base_url=server.url, timeout=60, headers={"authorization": "Bearer s3cret"}) as c:
                rs = await asyncio.gather(*(c.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 60})
                                            for _ in range(8)))
                return [r.status_code for r in rs], [r.json() for r in rs]

        codes, bodies = asyncio.run(flood())
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}
        assert "max_queue" in next(b for c, b in zip(codes, bodies) if c == 429)["error"]["message"]
        assert client.completions.create(model="tiny", prompt="Hello", max_tokens=3).choices[0].text is not None
    finally:
        assert server.stop() == 0


def test_a_two_process_server_answers_as_one_process(stories260k):
    """torchrun with 2 Gloo ranks: rank 0 serves, both step; the same answers as one process, and SIGTERM ends both."""
    requests = [
        {"prompt": "Once upon a time", "max_tokens": 25, "temperature": 0},
        {"prompt": "Tom had a big dog", "max_tokens": 20, "temperature": 0.9, "seed": 4},
        {"prompt": "One day", "max_tokens": 20, "temperature": 1.0, "top_k": 10, "seed": 8, "n": 2},
    ]

    def answers(server):
        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                rs = await asyncio.gather(*(c.post("/v1/completions", json={"model": "stories260K", **r}) for r in requests))
                return [[ch["text"] for ch in r.json()["choices"]] for r in rs]

        return asyncio.run(run())

    results = []
    for nproc in (0, 2):
        server = Server(stories260k, stories260k / "tokenizer.model", nproc=nproc, max_batch_size=2)
        try:
            results.append(answers(server))
        finally:
            assert server.stop() == 0, server.proc.stdout.read()[-3000:]
    assert results[0] == results[1]


def test_an_engine_failure_is_a_500_and_the_server_goes_on(tiny_tokenizer_path):
    """In process (ASGI): a model that fails on one request's tokens fails that request only."""
    from llama.server import create_app
    from llama.serving import EngineLoop
    from llama.tokenizer import Tokenizer
    from tests.scripted import scripted_llama

    def script(sequence):
        if 90 in sequence:
            raise RuntimeError("CUDA out of memory (simulated)")
        return 10 + (sequence[-1] - 9) % 50

    tokenizer = Tokenizer(str(tiny_tokenizer_path))
    llama = scripted_llama(tokenizer, script, max_batch_size=2)
    loop = EngineLoop(llama.engine).start()
    app = create_app(loop, tokenizer, "scripted")

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            bad = await client.post("/v1/completions", json={"model": "scripted", "prompt": [1, 90], "max_tokens": 3})
            streamed = await client.post("/v1/completions", json={"model": "scripted", "prompt": [1, 90], "max_tokens": 3,
                                                                   "stream": True})
            good = await client.post("/v1/completions", json={"model": "scripted", "prompt": [1, 20], "max_tokens": 3})
            return bad, streamed, good

    try:
        bad, streamed, good = asyncio.run(run())
    finally:
        loop.stop(1.0)
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    assert "out of memory (simulated)" in bad.json()["error"]["message"]
    assert '"server_error"' in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 3
    assert loop.metrics.finished.labels("error")._value.get() == 2


def test_sigterm_lets_running_requests_finish_and_exits_0():
    server = Server(None, None, max_seq_len=512, max_batch_size=2)  # the demo model: its story runs 341 tokens

    async def stream_then_stop():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json={"model": "stories260K", "prompt": "Once upon a time",
                                                                       "max_tokens": 300, "temperature": 0, "stream": True}) as r:
                lines = []
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and not lines:
                        os.kill(server.serving_pid(), signal.SIGTERM)  # mid-stream
                    if line:
                        lines.append(line)
                return lines

    lines = asyncio.run(stream_then_stop())
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # it ran to its end during the graceful shutdown
    assert len([c for c in chunks if c["choices"][0]["text"]]) > 100
    assert server.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=1)


def test_serve_steps_the_engine_in_the_main_thread_and_stops_on_sigterm(tiny_tokenizer_path):
    """serve() runs uvicorn in a thread and the engine in the caller's (here the main) thread; SIGTERM to the
    process shuts both down gracefully and serve() reports that uvicorn had started."""
    import threading

    import uvicorn

    from llama.server import create_app, serve
    from llama.serving import EngineLoop
    from llama.tokenizer import Tokenizer
    from tests.scripted import scripted_llama

    tokenizer = Tokenizer(str(tiny_tokenizer_path))
    llama = scripted_llama(tokenizer, lambda sequence: 10 + sequence[-1] % 50, max_batch_size=2)
    stepped_in = set()
    step = llama.engine.step
    llama.engine.step = lambda: (stepped_in.add(threading.current_thread().name), step())[1]
    loop = EngineLoop(llama.engine)
    port = free_port()
    config = uvicorn.Config(create_app(loop, tokenizer, "scripted"), host="127.0.0.1", port=port, log_level="warning")
    answers = []

    def client():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                answers.append(httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                                          json={"model": "scripted", "prompt": [1, 20], "max_tokens": 3}).json())
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=client).start()
    assert serve(loop, config) is True
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    assert answers[0]["usage"]["completion_tokens"] == 3
    assert stepped_in == {threading.main_thread().name}


def test_a_port_in_use_is_a_clear_error(tiny_checkpoints, tiny_tokenizer_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "llama.server", "--ckpt_dir", str(tiny_checkpoints[(None, 1)]),
                               "--tokenizer_path", str(tiny_tokenizer_path), "--device", "cpu", "--port", str(port),
                               "--max_seq_len", "64", "--log_level", "warning"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: could not serve on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr


@pytest.mark.parametrize("flag, value, match", [("prefill_chunk", "0", "prefill_chunk must be a positive integer"),
                                                ("max_prefill_tokens", "0", "max_prefill_tokens must be a positive integer"),
                                                ("max_queue", "-1", "max_queue must be an integer >= 0"),
                                                ("port", "70000", "port must be an integer from 0 to 65535"),
                                                ("log_level", "loud", "log_level must be one of critical")])
def test_a_bad_option_is_refused_before_the_weights_are_read(tmp_path, flag, value, match):
    """The checkpoint folder does not exist: the option's error comes first, naming it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["--ckpt_dir", str(tmp_path / "missing"), "--tokenizer_path", str(tmp_path / "missing.model"), "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "llama.server", *args, f"--{flag}", value],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert match in done.stderr
