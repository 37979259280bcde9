"""python -m llama.bench: smoke runs on the tiny shape, on the CPU."""

import json
import math
import time

import pytest
import torch

from llama import Llama, bench, cli, measure, native, random_model
from llama.quantize import quantize_model
from tests.conftest import check_exit, launch

SMALL = {"shape": "tiny", "device": "cpu", "prompt_len": 8, "gen_len": 8, "batch": 2, "warmup": 1, "repeats": 2}
SPEED_KEYS = {"ttft_s", "prefill_tok_s", "decode_step_s", "decode_tok_s", "e2e_tok_s", "bytes_per_step", "achieved_gbs", "bandwidth_pct"}


def _check_speeds(r: dict, batches=("1", "2")) -> None:
    assert r["copy_bandwidth_gbs"] > 0 and r["peak_memory_bytes"] > 0 and r["params"] > 0
    assert r["copy_bandwidth_gbs"] == max(r["copy_bandwidth_gbs_start_end"])
    assert r["ttft_s"] > 0 and r["prefill_tok_s"] > 0
    assert sorted(r["ours"]) == sorted(batches)
    for b in batches:
        run = r["ours"][b]
        assert SPEED_KEYS <= set(run), b
        for key in SPEED_KEYS:
            assert run[key] is not None and math.isfinite(run[key]) and run[key] > 0, (b, key, run[key])
        # The bandwidth share comes from the two measured numbers: bytes per step over step time, over the copy rate.
        assert run["achieved_gbs"] == pytest.approx(run["bytes_per_step"] / run["decode_step_s"] / 1e9)
        assert run["bandwidth_pct"] == pytest.approx(100 * run["achieved_gbs"] / r["copy_bandwidth_gbs"])
        assert run["decode_tok_s"] == pytest.approx(int(b) / run["decode_step_s"])
        assert run["bytes_per_step"] == run["weight_bytes_per_step"] + run["kv_bytes_per_step"]


def test_main_in_process(tmp_path, capsys):
    out = tmp_path / "r.json"
    r = bench.main(**SMALL, json=str(out))
    _check_speeds(r)
    assert r["world_size"] == 1 and r["dtype"] == "float32" and "hf" not in r
    assert r["max_seq_len"] == r["model_args"]["max_seq_len"] == 16  # prompt_len + gen_len
    assert json.loads(out.read_text())["ours"]["2"]["batch"] == 2
    table = capsys.readouterr().out
    assert "decode tok/s, batch 1" in table and "decode tok/s, batch 2" in table and "% of copy bandwidth" in table
    assert "decode_step_route" not in r and "decode step compiled" not in table  # eager: no compiled step
    # With --compile the table says how the step was compiled (its in-process fallback only warns).
    compiled = dict(r, compile=True, first_call_s=2.5, decode_step_route="ahead of time, loaded from the compile cache")
    assert "decode step compiled ahead of time, loaded from the compile cache" in bench.format_table(compiled)


def test_cli_writes_json(tmp_path):
    out = tmp_path / "r.json"
    args = ["-m", "llama.bench"] + [f"--{k}={v}" for k, v in SMALL.items()] + ["--json", out, "--max_seq_len", "40"]
    proc = launch(args, timeout=120)
    check_exit(proc)
    r = json.loads(out.read_text())
    _check_speeds(r)
    assert r["shape"] == "tiny" and r["prompt_len"] == 8 and r["gen_len"] == 8 and r["batch"] == 2
    assert r["max_seq_len"] == r["model_args"]["max_seq_len"] == 40 and "max_seq_len 40" in proc.stdout
    assert "prefill tok/s" in proc.stdout and "{" not in proc.stdout  # the table, not the returned dict


def test_compare_hf(capsys):
    pytest.importorskip("transformers")
    r = bench.main(**SMALL, compare_hf=True)
    for b in ("1", "2"):
        assert r["hf"][b]["decode_tok_s"] > 0
        assert r["speedup_decode"][b] == pytest.approx(r["ours"][b]["decode_tok_s"] / r["hf"][b]["decode_tok_s"])
        assert r["speedup_e2e"][b] > 0
        # The same weights, prompts and greedy decoding: the same tokens (float32 on one CPU).
        assert r["hf_tokens_match"][b] == 1.0
    assert "ours/HF" in capsys.readouterr().out


def test_quantized_against_its_float_baseline(capsys):
    pytest.importorskip("transformers")
    r = bench.main(**SMALL, quantize="int8", compare_hf=True)
    _check_speeds(r)
    assert r["quantize"] == "int8" and r["baseline_dtype"] == "float32"
    float_weights = r["params"] * 4
    # int8 attention/FFN weights: the stored bytes and each step's reads shrink; transformers reads float32.
    assert r["per_rank"]["weight_bytes"] < 0.8 * float_weights
    for b in ("1", "2"):
        assert r["ours"][b]["weight_bytes_per_step"] < r["hf"][b]["bytes_per_step"]
    agree = r["baseline_agreement"]
    assert agree["prompts"] == 2 and agree["first_n"] == 8  # batch prompts; 16 tokens or gen_len
    assert 0 <= agree["rows_first_n_equal"] <= 1 and 0 <= agree["tokens_equal"] <= 1
    assert 0 <= agree["mean_tokens_before_first_difference"] <= 8
    e = r["logit_error"]
    # int8 per-channel weights on N(0, 1/in) weights: small next to the logits' spread, same top-1 nearly always.
    assert 0 < e["mean_abs"] < e["max_abs"] < e["reference_logit_std"]
    assert e["mean_abs"] < 0.05 * e["reference_logit_std"] and e["top1_agreement"] > 0.8
    table = capsys.readouterr().out
    assert "weights int8" in table and "logit error" in table and "2 prompts: rows whose first 8 tokens" in table
    # Which int8 kernel ran (llama's own on AVX2 CPUs) is in the header.
    assert ("int8 matmuls on llama's native AVX2 kernels" in table) == (r["native_kernels"] == "int8") == native.ready()


def test_agreement_on_more_prompts_than_the_batch():
    """The shares are those of 5 prompts (more than the batch, so generated in chunks), recomputed
    here from the same random model and prompts: float32 against int4, greedy."""
    r = bench.main(**SMALL, quantize="int4-g32", agreement_prompts=5)
    assert r["ours"]["2"]["batch"] == 2  # the timed batch is unchanged
    model = random_model.build_random_model("tiny", torch.device("cpu"), torch.float32, 16, 2, seed=0)
    prompts = torch.randint(0, model.vocab_size, (5, 8), generator=torch.Generator().manual_seed(0)).tolist()
    tokenizer = random_model.NoTextTokenizer(model.vocab_size)
    reference = Llama(model, tokenizer).generate(prompts, max_gen_len=8, temperature=0.0)[0]
    tokens = Llama(quantize_model(model, "int4-g32"), tokenizer).generate(prompts, max_gen_len=8, temperature=0.0)[0]
    rows_equal = sum(t == ref for t, ref in zip(tokens, reference))
    tokens_equal = sum(x == y for t, ref in zip(tokens, reference) for x, y in zip(t, ref))
    agree = r["baseline_agreement"]
    assert agree["prompts"] == 5 and agree["first_n"] == 8
    assert agree["rows_first_n_equal"] == rows_equal / 5 and agree["tokens_equal"] == tokens_equal / 40
    assert rows_equal < 5  # int4 changed something, so the comparison has teeth


def test_cast_without_quantizing_reports_agreement():
    r = bench.main(**SMALL, dtype="bfloat16", baseline_dtype="float32")
    assert r["dtype"] == "bfloat16" and r["quantize"] is None and "logit_error" in r
    assert r["per_rank"]["weight_bytes"] == r["params"] * 2


def test_under_torchrun(tmp_path):
    out = tmp_path / "r.json"
    args = ["-m", "llama.bench"] + [f"--{k}={v}" for k, v in SMALL.items()] + ["--json", out, "--max_seq_len", "40"]
    proc = launch(args, nproc=2, timeout=180)
    check_exit(proc)
    r = json.loads(out.read_text())
    assert r["world_size"] == 2 and r["model_parallel_size"] == 2
    assert r["per_rank"]["n_local_heads"] == random_model.SHAPES["tiny"]["n_heads"] // 2
    # Each rank holds half of the weights (the norms are replicated and tiny).
    assert r["per_rank"]["weight_bytes"] < 0.6 * r["params"] * 4
    _check_speeds(r)
    assert proc.stdout.count("llama.bench: shape tiny") == 1  # rank 0 prints


def test_peak_memory_restart_forgets_earlier_peaks():
    memory = measure.PeakMemory(torch.device("cpu"))
    if memory.method != "VmHWM":
        pytest.skip("the resident set's high-water mark cannot be reset here (/proc/self/clear_refs)")
    mib = 2**20
    big = torch.ones(256 * mib // 4)  # 256 MiB, written, so resident
    del big
    assert memory.peak() >= 200 * mib
    memory.restart()
    kept = torch.ones(64 * mib // 4)  # what is still in use counts, the 256 MiB peak no longer does
    assert 48 * mib <= memory.peak() < 200 * mib
    del kept


def test_random_model_dtype_and_bytes():
    model = random_model.build_random_model("tiny", torch.device("cpu"), torch.bfloat16, max_seq_len=16, max_batch_size=2)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in model.parameters())
    logits = model.forward(torch.tensor([[1, 2, 3]]), 0)
    assert torch.isfinite(logits).all() and logits.std() > 0

    s = random_model.SHAPES["tiny"]
    step = measure.decode_bytes_per_step(model, batch=2, prompt_len=10, gen_len=6)
    weights = sum(p.numel() for p in model.parameters()) * 2
    assert step["weights"] == weights - s["vocab_size"] * s["dim"] * 2 + 2 * s["dim"] * 2
    # keys and values, every layer, 2 rows, all heads, 13 positions on average, 2 bytes each
    assert step["kv"] == 2 * s["n_layers"] * 2 * s["dim"] * 13 * 2
    assert step["total"] == step["weights"] + step["kv"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        random_model.build_random_model("3B", torch.device("cpu"), torch.float32, 8, 1)
    with pytest.raises(ValueError, match="agreement_prompts must be an integer >= 1"):
        bench.run(shape="tiny", agreement_prompts=0)
    with pytest.raises(ValueError, match="gen_len"):
        bench.run("tiny", "cpu", gen_len=1)
    with pytest.raises(ValueError, match="quantize"):
        bench.run("tiny", "cpu", quantize="int3")
    with pytest.raises(ValueError, match=r"max_seq_len must be an integer >= prompt_len \+ gen_len = 12"):
        bench.run("tiny", "cpu", prompt_len=8, gen_len=4, max_seq_len=11)
    with pytest.raises(ValueError, match=r"seed must be an integer from -2\*\*63 to 2\*\*64 - 1"):
        bench.run("tiny", "cpu", seed=2**70)


def test_the_json_path_is_checked_first(tmp_path):
    """A --json path that cannot be written is refused before the run, with what is wrong and what to do."""
    assert measure.check_output_path(None) is None and measure.check_output_path("") is None
    assert measure.check_output_path(str(tmp_path / "r.json")) == str(tmp_path / "r.json")
    with pytest.raises(ValueError, match=f"--json {tmp_path}: is a directory; give a file name in it"):
        measure.check_output_path(tmp_path)
    with pytest.raises(ValueError, match=r"--output .*: the directory .*missing does not exist; create it"):
        measure.check_output_path(tmp_path / "missing" / "r.json", "--output")
    with pytest.raises(ValueError, match="does not exist"):
        bench.main(**SMALL, json=str(tmp_path / "missing" / "r.json"))


def test_bench_checks_the_json_path_before_any_work(tmp_path):
    """--json into a folder that does not exist failed only after the whole run (minutes for the default shape)."""
    for module in ("llama.bench", "llama.bench_serving", "llama.bench_http"):
        start = time.perf_counter()
        proc = launch(["-m", module, "--json", tmp_path / "missing" / "r.json"], timeout=120)
        assert proc.returncode == cli.EXIT_USER_ERROR and "Traceback" not in proc.stderr, proc.stderr
        assert f"the directory {tmp_path / 'missing'} does not exist" in proc.stderr
        assert time.perf_counter() - start < 60
