"""The llama.cpp baseline of the benchmark (python -m llama.bench --compare_llamacpp PATH_TO_LLAMA_BENCH).

The benchmark's random model is written as a Hugging Face directory, converted to GGUF by llama.cpp's own
convert_hf_to_gguf.py at the precision that matches ours (float32 -> f32, bfloat16 -> bf16, float16 -> f16,
int8 -> q8_0, int4 -> q4_0 through llama-quantize), and timed by llama.cpp's llama-bench (batch-1 decode after a
prompt's worth of context, as ours) and, for the larger batch, llama-batched-bench. Everything llama.cpp reads or
writes lives in a temporary directory removed afterwards. Building llama.cpp is the user's business (README.md,
"Against llama.cpp", gives the commands); when it cannot be found the comparison is skipped with the reason.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from llama.hf_write import save_hf
from llama.quantized_linear import QuantScheme
from llama.random_model import SHAPES, STAND_IN_MIN_VOCAB, stand_in_tokenizer

CONVERTER = "convert_hf_to_gguf.py"
DIR_VARIABLE = "LLAMA_CPP_DIR"  # a llama.cpp source tree, built in build/ (README's commands)
BUILD_HINT = ("build llama.cpp as README.md says ('Against llama.cpp'), then pass its build/bin/llama-bench "
              "(or set LLAMA_CPP_DIR to its source directory)")
_FLOAT_TYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_SCAN_PARENTS = 4  # build/bin/llama-bench sits 2 levels below the source tree; allow an extra level or two


class LlamaCppError(OSError):
    """llama.cpp failed or said something we cannot read. An OSError, as for any other tool or file of the machine
    that does not work, so that the command line reports it in a line (llama/cli.py) with llama.cpp's own words."""


@dataclass
class LlamaCpp:
    """Where llama.cpp's tools are, and which GGUF type they run; skipped says why the comparison cannot run."""

    bench: Optional[Path] = None
    converter: Optional[Path] = None
    quantizer: Optional[Path] = None  # llama-quantize, for q4_0
    batched_bench: Optional[Path] = None  # llama-batched-bench, for the larger batch; optional
    gguf_type: str = ""
    tokenizer: Optional[Path] = None  # None: a stand-in of the model's vocabulary size
    skipped: Optional[str] = None


def gguf_type(dtype: torch.dtype, quantize_bits: Optional[int]) -> str:
    """llama.cpp's type closest to ours: int8 weights with a scale per row -> q8_0 (a scale per 32), int4 with
    groups -> q4_0 (groups of 32), else the float type itself."""
    if quantize_bits == 8:
        return "q8_0"
    if quantize_bits == 4:
        return "q4_0"
    if dtype not in _FLOAT_TYPES:
        raise ValueError(f"--compare_llamacpp has no GGUF type for {dtype}; use float32, bfloat16 or float16")
    return _FLOAT_TYPES[dtype]


def _tool(bench: Path, name: str) -> Optional[Path]:
    """A llama.cpp tool built beside llama-bench (same build, same version), if there."""
    path = bench.with_name(name + bench.suffix)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _find_converter(bench: Path, llamacpp_dir: Optional[str]) -> Union[Path, str]:
    """convert_hf_to_gguf.py, or why it was not found. --llamacpp_dir first, then the source tree llama-bench was
    built in (the converter of the same version), then LLAMA_CPP_DIR."""
    if llamacpp_dir is not None:
        path = Path(llamacpp_dir).expanduser() / CONVERTER
        if not path.is_file():
            raise FileNotFoundError(f"--llamacpp_dir {llamacpp_dir}: no {CONVERTER} there; pass llama.cpp's source "
                                    f"directory (the one holding {CONVERTER})")
        return path
    looked = [parent / CONVERTER for parent in list(bench.resolve().parents)[:_SCAN_PARENTS]]
    if os.environ.get(DIR_VARIABLE):
        looked.append(Path(os.environ[DIR_VARIABLE]).expanduser() / CONVERTER)
    for path in looked:
        if path.is_file():
            return path
    return (f"llama.cpp's converter {CONVERTER} was not found (looked in {', '.join(str(p.parent) for p in looked)}); "
            f"pass --llamacpp_dir LLAMA_CPP_SOURCE_DIR")


def _find_bench(compare: Union[bool, str]) -> Union[Path, str]:
    """The llama-bench binary, or why there is none. A path the user gave must be one (an error otherwise); with
    the bare flag it is looked for on PATH and in LLAMA_CPP_DIR/build/bin."""
    if compare is not True:
        path = Path(str(compare)).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"--compare_llamacpp {compare} is a directory; pass the llama-bench binary itself, "
                                    f"e.g. {path / 'build' / 'bin' / 'llama-bench'}")
        if not path.is_file():
            raise FileNotFoundError(f"--compare_llamacpp {compare}: no such file; {BUILD_HINT}")
        if not os.access(path, os.X_OK):
            raise PermissionError(f"--compare_llamacpp {compare} is not executable (chmod +x it, or pass llama.cpp's "
                                  f"build/bin/llama-bench)")
        return path
    found = shutil.which("llama-bench")
    if found:
        return Path(found)
    if os.environ.get(DIR_VARIABLE):
        path = Path(os.environ[DIR_VARIABLE]).expanduser() / "build" / "bin" / "llama-bench"
        if path.is_file():
            return path
    return f"llama-bench was not found on PATH or in ${DIR_VARIABLE}/build/bin; {BUILD_HINT}"


def check_tokenizer(path: str, vocab_size: int) -> Path:
    """A SentencePiece tokenizer.model of exactly vocab_size pieces (the converter would silently pad or cut it)."""
    import sentencepiece

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--llamacpp_tokenizer {path}: no such file (a SentencePiece tokenizer.model)")
    try:
        pieces = sentencepiece.SentencePieceProcessor(model_file=str(file)).vocab_size()
    except (RuntimeError, OSError) as e:
        raise ValueError(f"--llamacpp_tokenizer {path} is not a SentencePiece model: {e}") from None
    if pieces != vocab_size:
        raise ValueError(f"--llamacpp_tokenizer {path} has {pieces} pieces, the model's vocabulary {vocab_size}: pass "
                         f"a tokenizer of {vocab_size} pieces, or leave the flag out for a stand-in")
    return file


def locate(compare: Union[bool, str, None], llamacpp_dir: Optional[str], tokenizer: Optional[str], shape: str,
           device: torch.device, world: int, dtype: torch.dtype, scheme: Optional[QuantScheme]) -> Optional[LlamaCpp]:
    """llama.cpp's tools for --compare_llamacpp, checked before any work; None without the flag (or for a shape the
    model's build refuses). A path given that is wrong is an error naming it; tools that are simply not there give a
    LlamaCpp whose skipped says what is missing and how to fix it."""
    if compare in (None, False) or shape not in SHAPES:
        return None
    if world > 1:
        raise ValueError("--compare_llamacpp runs in a single process only (llama.cpp's model is not split over ranks)")
    if device.type != "cpu":
        raise ValueError(f"--compare_llamacpp compares CPU decoding (llama.cpp runs on the CPU here); "
                         f"use --device cpu, not {device.type}")
    kind = gguf_type(dtype, scheme.bits if scheme is not None else None)
    vocab_size = SHAPES[shape]["vocab_size"]
    token_file = check_tokenizer(tokenizer, vocab_size) if tokenizer is not None else None
    if token_file is None and vocab_size < STAND_IN_MIN_VOCAB:
        raise ValueError(f"--compare_llamacpp: a vocabulary of {vocab_size} is too small for the stand-in tokenizer "
                         f"(llama.cpp looks up {STAND_IN_MIN_VOCAB} byte and special pieces); pass "
                         f"--llamacpp_tokenizer with a SentencePiece model of {vocab_size} pieces")
    bench = _find_bench(compare)
    if isinstance(bench, str):
        return LlamaCpp(gguf_type=kind, skipped=bench)
    converter = _find_converter(bench, llamacpp_dir)
    if isinstance(converter, str):
        return LlamaCpp(bench=bench, gguf_type=kind, skipped=converter)
    quantizer = _tool(bench, "llama-quantize")
    if kind == "q4_0" and quantizer is None:
        return LlamaCpp(bench=bench, converter=converter, gguf_type=kind,
                        skipped=f"q4_0 needs llama-quantize beside {bench} (build the llama-quantize target too)")
    return LlamaCpp(bench, converter, quantizer, _tool(bench, "llama-batched-bench"), kind, token_file)


# --- running llama.cpp ---------------------------------------------------------------------------


def _run(command: List[str], what: str) -> str:
    """command's stdout; a LlamaCppError with the end of its output when it fails."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise LlamaCppError(f"{what} could not be started ({' '.join(command)}): {e}") from None
    if proc.returncode != 0:
        # A crash leaves no message of its own (llama.cpp's AMX kernels segfault on some machines): name the signal.
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if -proc.returncode in signal.valid_signals()
               else f"exit {proc.returncode}")
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise LlamaCppError(f"{what} failed ({how}): {' '.join(command)}\n{tail}")
    return proc.stdout


def bench_command(tools: LlamaCpp, gguf: Path, prompt_len: int, gen_len: int, threads: int, repeats: int) -> List[str]:
    """llama-bench's decode at batch 1: gen_len tokens after prompt_len tokens of context (-d; not timed), as our
    decode steps follow the prompt (at 134M, 128 tokens of context cost llama.cpp a third of its speed); no prompt
    timing (-p 0); all layers on the CPU (-ngl 0).

    The context goes in one token at a time (-ub 1): on the Xeon VM of README's table, whose CPU reports AMX,
    llama.cpp's AMX kernels for quantized weights crash (SIGILL or SIGSEGV in ggml_backend_amx_mul_mat) on a batch
    of several tokens, while one token takes their AVX-512 path, which works. The timed steps are one token each
    anyway: -ub 1 leaves their speed as it is (measured at depth 0).
    """
    return [str(tools.bench), "-m", str(gguf), "-p", "0", "-n", str(gen_len), "-d", str(prompt_len), "-ub", "1",
            "-t", str(threads), "-r", str(repeats), "-ngl", "0", "-o", "json"]


def parse_bench(stdout: str, gen_len: int) -> dict:
    """llama-bench's JSON (-o json): the decode test's tokens per second, best and mean of its repetitions, and what
    it says about the build and the model."""
    try:
        tests = json.loads(stdout)
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench's output is not JSON ({e}): {stdout[:200]!r}") from None
    found = [t for t in tests if isinstance(t, dict) and t.get("n_gen") == gen_len and t.get("n_prompt") == 0] \
        if isinstance(tests, list) else []
    if len(found) != 1 or not found[0].get("samples_ts"):
        raise LlamaCppError(f"llama-bench's JSON has no single decode test of {gen_len} tokens with samples_ts: "
                            f"{stdout[:300]!r}")
    t = found[0]
    samples = [float(x) for x in t["samples_ts"]]
    return {
        "decode_tok_s": max(samples),  # the best repetition, as ours: interference only ever slows a run
        "decode_tok_s_mean": float(t.get("avg_ts", sum(samples) / len(samples))),
        "decode_tok_s_stddev": t.get("stddev_ts"),
        "samples_tok_s": samples,
        "n_threads": t.get("n_threads"),
        "n_depth": t.get("n_depth"),
        "build": f"{t.get('build_number', '?')} ({t.get('build_commit', '?')})",
        "cpu_info": t.get("cpu_info"),
        "backends": t.get("backends"),
        "model_type": t.get("model_type"),
        "model_bytes": t.get("model_size"),
    }


def batched_command(tools: LlamaCpp, gguf: Path, batch: int, prompt_len: int, gen_len: int, threads: int,
                    repeats: int) -> List[str]:
    """llama-batched-bench's decode of batch rows at once after a prompt each; -npl repeats the same batch size so
    one process (one model load) gives every repetition. The context holds all rows (-c), else it skips the test."""
    return [str(tools.batched_bench), "-m", str(gguf), "-c", str(batch * (prompt_len + gen_len)),
            "-b", "2048", "-ub", "512", "-npp", str(prompt_len), "-ntg", str(gen_len),
            "-npl", ",".join([str(batch)] * repeats), "-t", str(threads), "-tb", str(threads), "-ngl", "0",
            "--output-format", "jsonl"]


def parse_batched(stdout: str, batch: int, gen_len: int) -> dict:
    """llama-batched-bench's JSON lines: speed_tg (pl * tg / t_tg) of each repetition, the best of them."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("pl") == batch and row.get("tg") == gen_len and "speed_tg" in row:
                rows.append(row)
    if not rows:
        raise LlamaCppError(f"llama-batched-bench printed no result for batch {batch}, {gen_len} tokens: "
                            f"{stdout[-300:]!r}")
    samples = [float(r["speed_tg"]) for r in rows]
    return {"decode_tok_s": max(samples), "decode_tok_s_mean": sum(samples) / len(samples), "samples_tok_s": samples}


def export_gguf(model: torch.nn.Module, tools: LlamaCpp, directory: Path, threads: int,
                timed_dtype: torch.dtype) -> Path:
    """The model's weights as a GGUF file of tools.gguf_type in directory, through a Hugging Face directory and
    llama.cpp's converter (and llama-quantize for q4_0, from the timed float type)."""
    hf_dir = directory / "hf"
    params = {k: v for k, v in asdict(model.params).items() if k not in ("max_batch_size", "max_seq_len")}
    save_hf(model.state_dict(), params, hf_dir)
    token_file = hf_dir / "tokenizer.model"
    if tools.tokenizer is not None:
        shutil.copyfile(tools.tokenizer, token_file)
    else:
        token_file.write_bytes(stand_in_tokenizer(model.params.vocab_size))
    quantize_later = tools.gguf_type == "q4_0"
    outtype = _FLOAT_TYPES.get(timed_dtype, "f32") if quantize_later else tools.gguf_type
    converted = directory / f"model-{outtype}.gguf"
    # The converter imports its own gguf-py from its source tree (unless NO_LOCAL_GGUF is set), so its versions match.
    _run([sys.executable, str(tools.converter), str(hf_dir), "--outfile", str(converted), "--outtype", outtype],
         f"llama.cpp's converter ({tools.converter})")
    shutil.rmtree(hf_dir)  # not needed any more: the disk holds one copy of the weights at a time
    if not quantize_later:
        return converted
    quantized = directory / "model-q4_0.gguf"
    _run([str(tools.quantizer), str(converted), str(quantized), "Q4_0", str(threads)], "llama-quantize")
    converted.unlink()
    return quantized


def _shown(command: List[str]) -> str:
    """command as the results show it: the tool by its name, the GGUF file (in a directory removed by then) by its."""
    return " ".join([Path(command[0]).name] + [Path(a).name if a.endswith(".gguf") else a for a in command[1:]])


def measure(model: torch.nn.Module, tools: Optional[LlamaCpp], prompt_len: int, gen_len: int, batches: List[int],
            repeats: int, timed_dtype: torch.dtype) -> Optional[dict]:
    """llama.cpp's decode speed on model's weights at batch 1 (llama-bench) and at the larger batch
    (llama-batched-bench, when built), with the commands run; {"skipped": why} when tools.skipped, None without
    tools."""
    if tools is None:
        return None
    if tools.skipped:
        print(f"llama.bench: the llama.cpp comparison is skipped: {tools.skipped}", file=sys.stderr, flush=True)
        return {"skipped": tools.skipped, "gguf_type": tools.gguf_type}
    threads = torch.get_num_threads()  # the benchmark's own: both sides get the same cores
    out: Dict[str, object] = {"gguf_type": tools.gguf_type, "threads": threads, "commands": [],
                              "tokenizer": str(tools.tokenizer) if tools.tokenizer else "stand-in"}
    with tempfile.TemporaryDirectory(prefix="llama-bench-gguf-") as tmp:
        gguf = export_gguf(model, tools, Path(tmp), threads, timed_dtype)
        out["gguf_bytes"] = gguf.stat().st_size
        command = bench_command(tools, gguf, prompt_len, gen_len, threads, repeats)
        out["1"] = parse_bench(_run(command, "llama-bench"), gen_len)
        out["commands"].append(_shown(command))
        larger = [b for b in batches if b > 1]
        if larger and tools.batched_bench is None:
            out["batched_skipped"] = f"llama-batched-bench is not beside {tools.bench} (build that target too)"
        for b in larger if tools.batched_bench is not None else []:
            command = batched_command(tools, gguf, b, prompt_len, gen_len, threads, repeats)
            out["commands"].append(_shown(command))
            try:
                out[str(b)] = parse_batched(_run(command, "llama-batched-bench"), b, gen_len)
            except LlamaCppError as e:
                # Batch 1 is the comparison; the larger batch is extra, and its failure (the AMX crash of
                # bench_command's note, which no batch of one token avoids) is reported instead of ending the run.
                out["batched_skipped"] = str(e).replace(str(gguf), gguf.name)
    return out


# --- results -------------------------------------------------------------------------------------


def add_results(results: dict, theirs: Optional[dict]) -> None:
    """results["llamacpp"]: measure()'s, and results["ours_over_llamacpp"]: ours / llama.cpp decode tokens per second
    at each batch both ran. Nothing without a comparison."""
    if theirs is None:
        return
    results["llamacpp"] = theirs
    results["ours_over_llamacpp"] = {
        b: run["decode_tok_s"] / theirs[b]["decode_tok_s"]
        for b, run in results["ours"].items()
        if isinstance(theirs.get(b), dict) and run.get("decode_tok_s") and theirs[b].get("decode_tok_s")
    }


def table_lines(results: dict) -> List[str]:
    """The comparison under the benchmark's table: decode tok/s, ours next to llama.cpp's, and the ratio."""
    lc = results.get("llamacpp")
    if lc is None:
        return []
    if "skipped" in lc:
        return ["", f"llama.cpp comparison skipped: {lc['skipped']}"]
    one = lc["1"]
    lines = ["", f"llama.cpp build {one['build']}, {lc['gguf_type']} GGUF ({lc['gguf_bytes'] / 1e6:.0f} MB, "
                 f"converted by convert_hf_to_gguf.py, tokenizer {lc['tokenizer']}), {lc['threads']} threads, "
                 f"best of {len(one['samples_tok_s'])}:",
             f"{'':36}{'ours':>12}{'llama.cpp':>12}{'ours/llama.cpp':>16}"]
    for b in sorted(results["ours"], key=int):
        if b not in lc:
            continue
        ours, theirs = results["ours"][b].get("decode_tok_s"), lc[b]["decode_tok_s"]
        ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
        shown = f"{ours:.1f}" if ours else "-"  # None where noise left the long runs no slower than the short
        lines.append(f"{'decode tok/s, batch ' + b:36}{shown:>12}{theirs:>12.1f}{ratio:>16}")
    lines += [f"  {c}" for c in lc["commands"]]
    if "batched_skipped" in lc:
        lines.append(f"  batch > 1 not compared: {lc['batched_skipped'].splitlines()[0]} (the JSON has the rest)")
    return lines
