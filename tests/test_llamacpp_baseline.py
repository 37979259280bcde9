"""python -m llama.bench --compare_llamacpp: llama.cpp's tools faked by small scripts (the commands we build, the
output we parse, what is skipped and what is an error), and llama.cpp itself on the tiny shape when LLAMA_CPP_DIR
names a built llama.cpp source tree."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from llama import bench, llamacpp_baseline, random_model
from llama.llamacpp_baseline import LlamaCppError
from llama.quantized_linear import QuantScheme

SMALL = {"shape": "tiny", "device": "cpu", "prompt_len": 8, "gen_len": 8, "batch": 2, "warmup": 1, "repeats": 2}
TINY_VOCAB = 512

# Each fake appends {"tool", "argv"} (and what it checked) to calls.jsonl at the top of its fake source tree.
_LOG = """
import json, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[{depth}]
def log(**kw):
    with open(ROOT / "calls.jsonl", "a") as f:
        f.write(json.dumps({{"tool": Path(sys.argv[0]).name, "argv": sys.argv[1:], **kw}}) + "\\n")
def arg(flag):
    return sys.argv[sys.argv.index(flag) + 1]
"""

CONVERTER = """
import sentencepiece
hf = Path(sys.argv[1])
config = json.loads((hf / "config.json").read_text())
pieces = sentencepiece.SentencePieceProcessor(model_file=str(hf / "tokenizer.model")).vocab_size()
log(files=sorted(p.name for p in hf.iterdir()), vocab_size=config["vocab_size"], pieces=pieces,
    dtype=config["torch_dtype"])
Path(arg("--outfile")).write_bytes(b"GGUF" + bytes(1000))
"""

QUANTIZE = """
log()
Path(sys.argv[2]).write_bytes(Path(sys.argv[1]).read_bytes()[:500])
"""

BENCH = """
model = Path(arg("-m"))
log(model_exists=model.is_file())
n, r = int(arg("-n")), int(arg("-r"))
samples = [100.0 + 25.0 * i for i in range(r)]
print(json.dumps([{"build_commit": "fake123", "build_number": 42, "cpu_info": "fake CPU", "backends": "CPU",
                   "model_type": "llama ?B", "model_size": model.stat().st_size, "n_threads": int(arg("-t")),
                   "n_prompt": 0, "n_gen": n, "n_depth": int(arg("-d")), "avg_ts": sum(samples) / r,
                   "stddev_ts": 1.0, "samples_ts": samples}], indent=2))
"""

BATCHED = """
log()
print("main: n_kv_max = ..., loading")
for i, pl in enumerate(arg("-npl").split(",")):
    print(json.dumps({"pp": int(arg("-npp")), "tg": int(arg("-ntg")), "pl": int(pl), "speed_tg": 500.0 + i}))
"""


def _script(path: Path, body: str, depth: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n" + _LOG.format(depth=depth) + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_llamacpp(root: Path, tools=("llama-bench", "llama-quantize", "llama-batched-bench"), bench_body=BENCH) -> Path:
    """A fake llama.cpp source tree: the converter at root, the tools in root/build/bin; returns llama-bench."""
    _script(root / "convert_hf_to_gguf.py", CONVERTER, depth=0)
    bodies = {"llama-bench": bench_body, "llama-quantize": QUANTIZE, "llama-batched-bench": BATCHED}
    for tool in tools:
        _script(root / "build" / "bin" / tool, bodies[tool], depth=2)
    return root / "build" / "bin" / "llama-bench"


def calls(root: Path) -> list:
    return [json.loads(line) for line in (root / "calls.jsonl").read_text().splitlines()]


@pytest.fixture
def no_llamacpp_around(monkeypatch, tmp_path):
    """No llama-bench on PATH and no LLAMA_CPP_DIR, whatever this machine has."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv(llamacpp_baseline.DIR_VARIABLE, raising=False)


@pytest.mark.parametrize("dtype, quantize, gguf, outtype", [
    ("float32", None, "f32", "f32"),
    ("bfloat16", None, "bf16", "bf16"),
    ("float32", "int8", "q8_0", "q8_0"),
    ("float32", "int4-g32", "q4_0", "f32"),  # converted to the float type, then llama-quantize
])
def test_commands_and_results_with_fake_tools(tmp_path, capsys, dtype, quantize, gguf, outtype):
    root = tmp_path / "llama.cpp"
    llama_bench = fake_llamacpp(root)
    r = bench.main(**SMALL, dtype=dtype, quantize=quantize, compare_llamacpp=str(llama_bench))
    threads = str(torch.get_num_threads())
    log = calls(root)
    assert [c["tool"] for c in log] == (["convert_hf_to_gguf.py"] + ["llama-quantize"] * (gguf == "q4_0")
                                        + ["llama-bench", "llama-batched-bench"])
    convert = log[0]
    assert convert["argv"][convert["argv"].index("--outtype") + 1] == outtype
    # The Hugging Face directory the converter reads: the weights as made, config and a stand-in of the vocabulary.
    assert convert["files"] == ["config.json", "model.safetensors", "tokenizer.model"]
    assert convert["vocab_size"] == convert["pieces"] == TINY_VOCAB and convert["dtype"] == dtype
    if gguf == "q4_0":
        assert log[1]["argv"][2:] == ["Q4_0", threads]
    bench_call = next(c for c in log if c["tool"] == "llama-bench")
    model = bench_call["argv"][1]
    assert bench_call["argv"] == ["-m", model, "-p", "0", "-n", "8", "-d", "8", "-ub", "1", "-t", threads, "-r", "2",
                                  "-ngl", "0", "-o", "json"]
    assert bench_call["model_exists"] and Path(model).name == f"model-{gguf}.gguf"
    assert not Path(model).parent.exists()  # the temporary directory is gone
    batched = log[-1]["argv"]
    assert batched[batched.index("-npl") + 1] == "2,2" and batched[batched.index("-c") + 1] == "32"
    assert [batched[batched.index(f) + 1] for f in ("-npp", "-ntg", "-t", "-ngl")] == ["8", "8", threads, "0"]

    lc = r["llamacpp"]
    assert lc["gguf_type"] == gguf and lc["threads"] == int(threads) and lc["tokenizer"] == "stand-in"
    assert lc["1"]["decode_tok_s"] == 125.0 and lc["1"]["decode_tok_s_mean"] == 112.5  # the best of 2, and the mean
    assert lc["1"]["samples_tok_s"] == [100.0, 125.0] and lc["1"]["build"] == "42 (fake123)"
    assert lc["2"]["decode_tok_s"] == 501.0 and lc["2"]["samples_tok_s"] == [500.0, 501.0]
    for b in ("1", "2"):
        assert r["ours_over_llamacpp"][b] == pytest.approx(r["ours"][b]["decode_tok_s"] / lc[b]["decode_tok_s"])
    shown = f"llama-bench -m model-{gguf}.gguf -p 0 -n 8 -d 8 -ub 1 -t {threads} -r 2 -ngl 0 -o json"
    assert lc["commands"][0] == shown
    table = capsys.readouterr().out
    assert f"llama.cpp build 42 (fake123), {gguf} GGUF" in table and "ours/llama.cpp" in table
    assert f"{r['ours_over_llamacpp']['1']:.2f}x" in table and lc["commands"][1] in table


def test_a_path_that_is_not_llama_bench_is_an_error_before_any_work(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before llama.cpp's path was checked")

    monkeypatch.setattr(bench, "build_random_model", no_model)
    missing = tmp_path / "nowhere" / "llama-bench"
    with pytest.raises(FileNotFoundError, match=fr"--compare_llamacpp {missing}: no such file; build llama.cpp as "
                                                fr"README.md says \('Against llama.cpp'\)"):
        bench.run(shape="134M", device="cpu", compare_llamacpp=str(missing))
    with pytest.raises(IsADirectoryError, match="is a directory; pass the llama-bench binary itself"):
        bench.run(shape="134M", device="cpu", compare_llamacpp=str(tmp_path))
    plain = tmp_path / "llama-bench"
    plain.write_text("")
    with pytest.raises(PermissionError, match=f"--compare_llamacpp {plain} is not executable"):
        bench.run(shape="134M", device="cpu", compare_llamacpp=str(plain))
    llama_bench = fake_llamacpp(tmp_path / "llama.cpp")
    with pytest.raises(FileNotFoundError, match=f"--llamacpp_dir {tmp_path}: no convert_hf_to_gguf.py there"):
        bench.run(shape="134M", device="cpu", compare_llamacpp=str(llama_bench), llamacpp_dir=str(tmp_path))
    with pytest.raises(ValueError, match="compares CPU decoding"):
        llamacpp_baseline.locate(str(llama_bench), None, None, "134M", torch.device("meta"), 1, torch.float32, None)


def test_skipped_with_the_reason_when_llamacpp_is_not_there(tmp_path, capsys, monkeypatch, no_llamacpp_around):
    r = bench.main(**SMALL, compare_llamacpp=True)  # the bare flag: looked for on PATH and in LLAMA_CPP_DIR
    assert r["llamacpp"]["skipped"].startswith("llama-bench was not found on PATH or in $LLAMA_CPP_DIR/build/bin")
    assert r["ours_over_llamacpp"] == {} and r["ours"]["1"]["decode_tok_s"] > 0  # ours still ran
    out, err = capsys.readouterr()
    assert "llama.cpp comparison skipped: llama-bench was not found" in out
    assert "the llama.cpp comparison is skipped: llama-bench was not found" in err

    # A llama-bench without its source tree: no converter.
    alone = fake_llamacpp(tmp_path / "llama.cpp")
    moved = tmp_path / "bin" / "llama-bench"
    moved.parent.mkdir()
    alone.rename(moved)
    tools = llamacpp_baseline.locate(str(moved), None, None, "tiny", torch.device("cpu"), 1, torch.float32, None)
    assert "convert_hf_to_gguf.py was not found" in tools.skipped and "--llamacpp_dir" in tools.skipped
    # ...found through LLAMA_CPP_DIR, as the bare flag finds llama-bench.
    monkeypatch.setenv(llamacpp_baseline.DIR_VARIABLE, str(tmp_path / "llama.cpp"))
    assert llamacpp_baseline.locate(str(moved), None, None, "tiny", torch.device("cpu"), 1, torch.float32,
                                    None).skipped is None

    # q4_0 needs llama-quantize.
    root = tmp_path / "no-quantize"
    llama_bench = fake_llamacpp(root, tools=("llama-bench",))
    int4 = QuantScheme(4, 32)
    tools = llamacpp_baseline.locate(str(llama_bench), None, None, "tiny", torch.device("cpu"), 1, torch.float32, int4)
    assert tools.skipped.startswith("q4_0 needs llama-quantize beside")
    # Without llama-batched-bench, batch 1 is compared and the reason for the rest is given.
    r = bench.main(**SMALL, compare_llamacpp=str(llama_bench))
    assert r["llamacpp"]["1"]["decode_tok_s"] == 125.0 and "2" not in r["llamacpp"]
    assert "llama-batched-bench is not beside" in r["llamacpp"]["batched_skipped"]
    assert list(r["ours_over_llamacpp"]) == ["1"]


def test_llamacpp_failures_are_reported_with_its_words(tmp_path):
    llama_bench = fake_llamacpp(tmp_path / "crash", bench_body="sys.stderr.write('ggml: out of luck'); sys.exit(3)")
    with pytest.raises(LlamaCppError, match=r"llama-bench failed \(exit 3\): .*\n.*ggml: out of luck"):
        bench.main(**SMALL, compare_llamacpp=str(llama_bench))
    llama_bench = fake_llamacpp(tmp_path / "segv", bench_body="import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(LlamaCppError, match=r"llama-bench failed \(killed by SIGSEGV\)"):
        bench.main(**SMALL, compare_llamacpp=str(llama_bench))
    assert isinstance(LlamaCppError("x"), OSError)  # the command line reports it in a line, as a user error


def test_parsing_llama_bench_output():
    test = {"n_prompt": 0, "n_gen": 64, "n_depth": 128, "avg_ts": 150.0, "stddev_ts": 5.0,
            "samples_ts": [140.0, 160.0, 150.0], "build_commit": "abc", "build_number": 7, "model_size": 10}
    prompt_test = {**test, "n_prompt": 512, "n_gen": 0, "samples_ts": [900.0]}
    parsed = llamacpp_baseline.parse_bench(json.dumps([prompt_test, test]), 64)
    assert parsed["decode_tok_s"] == 160.0 and parsed["decode_tok_s_mean"] == 150.0 and parsed["n_depth"] == 128
    assert parsed["build"] == "7 (abc)" and parsed["model_bytes"] == 10
    with pytest.raises(LlamaCppError, match="llama-bench's output is not JSON"):
        llamacpp_baseline.parse_bench("| model | size |", 64)
    with pytest.raises(LlamaCppError, match="no single decode test of 32 tokens"):
        llamacpp_baseline.parse_bench(json.dumps([test]), 32)
    with pytest.raises(LlamaCppError, match="no single decode test of 64 tokens"):
        llamacpp_baseline.parse_bench(json.dumps({"not": "a list"}), 64)

    rows = [{"pl": 8, "tg": 64, "speed_tg": 300.0}, {"pl": 8, "tg": 64, "speed_tg": 320.0}, {"pl": 4, "tg": 64}]
    lines = "\n".join(["log line", json.dumps(rows[0]), "{broken", json.dumps(rows[1]), json.dumps(rows[2])])
    parsed = llamacpp_baseline.parse_batched(lines, 8, 64)
    assert parsed == {"decode_tok_s": 320.0, "decode_tok_s_mean": 310.0, "samples_tok_s": [300.0, 320.0]}
    with pytest.raises(LlamaCppError, match="llama-batched-bench printed no result for batch 2, 64 tokens"):
        llamacpp_baseline.parse_batched(lines, 2, 64)


def test_gguf_types():
    assert llamacpp_baseline.gguf_type(torch.float32, None) == "f32"
    assert llamacpp_baseline.gguf_type(torch.bfloat16, None) == "bf16"
    assert llamacpp_baseline.gguf_type(torch.float16, None) == "f16"
    assert llamacpp_baseline.gguf_type(torch.bfloat16, 8) == "q8_0"
    assert llamacpp_baseline.gguf_type(torch.float32, 4) == "q4_0"
    with pytest.raises(ValueError, match="no GGUF type for torch.float64"):
        llamacpp_baseline.gguf_type(torch.float64, None)


def test_stand_in_tokenizer_and_the_tokenizer_flag(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    path = tmp_path / "tokenizer.model"
    path.write_bytes(random_model.stand_in_tokenizer(300))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert sp.vocab_size() == 300 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.unk_id() == 0
    assert sp.IsControl(1) and sp.IsControl(2) and sp.IsUnknown(0)
    assert sp.IsByte(3) and sp.IdToPiece(3 + 0x0A) == "<0x0A>"  # llama.cpp looks up the newline byte
    assert not sp.IsByte(259) and sp.IdToPiece(299) == "\u2581w40"
    with pytest.raises(ValueError, match="needs at least 259 pieces, not 100"):
        random_model.stand_in_tokenizer(100)
    # A tokenizer given must fit the model's vocabulary (the converter would silently pad or cut it).
    assert llamacpp_baseline.check_tokenizer(str(path), 300) == path
    with pytest.raises(ValueError, match=f"--llamacpp_tokenizer {path} has 300 pieces, the model's vocabulary 512"):
        bench.run(**SMALL, compare_llamacpp=True, llamacpp_tokenizer=str(path))
    with pytest.raises(FileNotFoundError, match="--llamacpp_tokenizer .*missing.model: no such file"):
        llamacpp_baseline.check_tokenizer(str(tmp_path / "missing.model"), 300)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        llamacpp_baseline.check_tokenizer(str(tmp_path / "junk.model"), 300)


def _real_llama_bench() -> Path:
    root = os.environ.get(llamacpp_baseline.DIR_VARIABLE)
    if not root:
        pytest.skip(f"llama.cpp not found: set {llamacpp_baseline.DIR_VARIABLE} to a llama.cpp source tree built as "
                    f"README.md says ('Against llama.cpp')")
    path = Path(root) / "build" / "bin" / "llama-bench"
    if not path.is_file():
        pytest.skip(f"llama.cpp not built: no {path}")
    return path


@pytest.mark.parametrize("quantize", [None, "int4-g32"])
def test_real_llamacpp_on_the_tiny_shape(quantize, capsys):
    """llama.cpp's own converter, llama-quantize, llama-bench and llama-batched-bench on the tiny model."""
    llama_bench = _real_llama_bench()
    r = bench.main(**SMALL, quantize=quantize, compare_llamacpp=str(llama_bench))
    lc = r["llamacpp"]
    assert "skipped" not in lc, lc
    assert lc["gguf_type"] == ("q4_0" if quantize else "f32") and lc["gguf_bytes"] > 0
    one = lc["1"]
    assert len(one["samples_tok_s"]) == 2 and one["decode_tok_s"] == max(one["samples_tok_s"]) > 0
    assert one["n_depth"] == 8 and one["n_threads"] == torch.get_num_threads() and one["backends"]
    if quantize and "2" not in lc:
        # An AMX build on a machine whose AMX crashes at batches of several tokens (llamacpp_baseline.bench_command):
        # batch 1 still compared, the crash reported. Float weights take no AMX kernel: batch 2 must run.
        assert "llama-batched-bench failed (killed by SIG" in lc["batched_skipped"], lc["batched_skipped"]
    else:
        assert lc["2"]["decode_tok_s"] > 0 and len(lc["2"]["samples_tok_s"]) == 2
    assert set(r["ours_over_llamacpp"]) == {"1"} | ({"2"} & set(lc))
    assert "ours/llama.cpp" in capsys.readouterr().out
