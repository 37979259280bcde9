"""python -m llama.bench_http: smoke runs on the tiny shape on the CPU (a server in this process, and one
reached by --url) that check every figure is present, finite and consistent; no timing assertions."""

import json
import math
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("httpx", reason="the HTTP benchmark needs the server-test extra: pip install -e '.[server-test]'")
pytest.importorskip("uvicorn", reason="the HTTP benchmark needs the server-test extra: pip install -e '.[server-test]'")

from llama import bench_http as bh  # noqa: E402
from llama.engine import Engine  # noqa: E402
from llama.random_model import NoTextTokenizer, build_random_model  # noqa: E402
from llama.workload import make_workload  # noqa: E402
from tests.conftest import check_exit, launch  # noqa: E402

SMALL = dict(shape="tiny", device="cpu", max_batch_size=3, requests=6, prompt_min=4, prompt_max=20, gen_min=2, gen_max=10)
FIGURES = ("throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "wall_s")


def _check(s: dict, gen_tokens: int) -> None:
    for key in FIGURES:
        assert s[key] is not None and math.isfinite(s[key]) and s[key] > 0, (key, s[key])
    assert s["generated_tokens"] == gen_tokens and s["requests"] == 6  # EOS off: every token asked for
    assert s["throughput_tok_s"] == pytest.approx(gen_tokens / s["wall_s"])
    assert s["ttft_p50_s"] <= s["ttft_p99_s"] and s["itl_p50_s"] <= s["itl_p99_s"]


@pytest.mark.parametrize("mode", [dict(concurrency=2), dict(arrival_rate=40.0, max_prefill_tokens=16)])
def test_in_process_run_reports_http_and_engine_figures(mode, capsys):
    r = bh.main(**SMALL, **mode)
    gen = sum(x.max_gen_len for x in make_workload(6, (4, 20), (2, 10), 512, seed=0))
    assert r["gen_tokens"] == gen
    _check(r["http"], gen)
    _check(r["engine"], gen)
    assert r["http"]["chunks"] == gen  # the stand-in tokenizer's text grows with every token
    assert r["http_over_engine_throughput"] == pytest.approx(r["http"]["throughput_tok_s"] / r["engine"]["throughput_tok_s"])
    assert r["usage_equals_ids_streamed"] and r["tokens_equal"] == 1.0  # greedy over HTTP = greedy on the engine
    assert 0 < r["engine"]["occupancy_mean"] <= 1
    cpu = r["http"]["cpu_s"]  # Linux: every thread's CPU time from /proc
    assert set(cpu) == {"http_server", "engine_loop", "other_threads"} and all(v >= 0 for v in cpu.values())
    assert cpu["engine_loop"] > 0 and r["engine"]["cpu_s"]["engine"] > 0 and r["http"]["client_cpu_s"] > 0
    # The same workload takes the same steps either way (closed loop, or the same arrival times: at least as many).
    for run in ("http", "engine"):
        assert 0 < r[run]["engine_busy_s"] <= r[run]["wall_s"] and r[run]["engine_steps"] > 0
    assert r["engine"]["engine_steps"] == r["engine"]["steps"]
    assert (r["prefill_chunk"], r["max_prefill_tokens"]) == (128, mode.get("max_prefill_tokens", 8192))  # CPU's defaults
    table = capsys.readouterr().out
    assert "% of the engine's own" in table and "HTTP" in table
    assert f"prefill chunk 128 ({r['max_prefill_tokens']} with none generating)" in table
    assert ("2 concurrent clients" if "concurrency" in mode else "Poisson arrivals, 40 requests/s") in table


def test_cli_against_a_running_server(tmp_path):
    model = build_random_model("tiny", torch.device("cpu"), torch.float32, 30, 3)
    tokenizer = NoTextTokenizer(model.vocab_size)
    engine = Engine(model, tokenizer)
    server = bh.InProcessServer(engine, tokenizer, "tiny-model", max_queue=16)
    try:
        out = tmp_path / "r.json"
        args = ["-m", "llama.bench_http", "--url", server.url, "--vocab_size", "512", "--concurrency", "3",
                "--max_batch_size", "2", "--repeats", "2", "--json", out] + [f"--{k}={v}" for k, v in SMALL.items() if k in ("requests", "prompt_min",
                                                                                                  "prompt_max", "gen_min", "gen_max")]
        with ThreadPoolExecutor(1) as pool:  # the engine steps in this thread meanwhile, as in llama.server
            proc = server.serve_until(pool.submit(launch, args, timeout=120))
        check_exit(proc)
    finally:
        server.stop()
    r = json.loads(out.read_text())
    assert r["model"] == "tiny-model" and "engine" not in r
    assert next(engine._ids) == 2 * 2 + 2 * 6  # the untimed warm-up (2 * max_batch_size requests), then two runs of 6
    gen = sum(x.max_gen_len for x in make_workload(6, (4, 20), (2, 10), 512, seed=0))
    _check(r["http"], gen)
    assert len(r["http"]["walls_s"]) == 2 and r["http"]["wall_s"] == min(r["http"]["walls_s"])
    assert "3 concurrent clients" in proc.stdout and "model tiny-model" in proc.stdout and "{" not in proc.stdout


def test_bad_arguments():
    with pytest.raises(ValueError, match="concurrency must be a positive integer"):
        bh.run(**SMALL, concurrency=0)
    with pytest.raises(ValueError, match="arrival_rate"):
        bh.run(**SMALL, arrival_rate=-1.0)
    with pytest.raises(ValueError, match="gen_min must be at least 2"):
        bh.run(**{**SMALL, "gen_min": 1})
    for name in ("prefill_chunk", "max_prefill_tokens"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            bh.run(**SMALL, **{name: 0})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_url_that_is_not_a_server_is_a_clear_error():
    with pytest.raises(ValueError, match="--url must start with http:// or https://"):
        bh.run(**SMALL, url="127.0.0.1:8000")
    with pytest.raises(OSError, match="cannot reach the server at http://127.0.0.1:.*start it first"):
        bh.run(**SMALL, url=f"http://127.0.0.1:{_free_port()}")  # nothing listens there


def test_a_server_that_wants_a_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("LLAMA_API_KEY", raising=False)
    model = build_random_model("tiny", torch.device("cpu"), torch.float32, 30, 2)
    tokenizer = NoTextTokenizer(model.vocab_size)
    server = bh.InProcessServer(Engine(model, tokenizer), tokenizer, "tiny-model", max_queue=4, api_key="s3cret")
    try:  # the key is checked before the engine is involved: nothing needs to step it
        with pytest.raises(OSError, match="wants an API key: pass --api_key"):
            bh.run(**SMALL, url=server.url)
    finally:
        server.stop()
