"""Inference benchmark on a random model of a named shape: no weights or tokenizer needed.

    python -m llama.bench --shape 134M --device cpu --dtype float32 --compare_hf
    torchrun --nproc_per_node 2 -m llama.bench --shape 7B --device cuda

It times the real generation path (Llama.generate, greedy) on random prompt token ids and reports
prefill speed, time to first token, decode speed at batch 1 and at --batch, peak memory, the bytes
each decode step must read, and the bandwidth that achieves as a share of the device's own copy
bandwidth measured in the same run. With --compare_hf it times transformers' LlamaForCausalLM.generate
on the very same weights, with --compare_llamacpp llama.cpp (llama/llamacpp_baseline.py). See the
"Performance" section of README.md for how each number is defined.
The serving benchmark (a mixed workload through the engine) is python -m llama.bench_serving.
"""

import os
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.distributed as dist

from llama.checks import check_seed, is_int
from llama.device import resolve_device, resolve_dtype
from llama.distributed import global_rank, setup_model_parallel
from llama import hf_baseline, llamacpp_baseline
from llama import quantize as quantization
from llama.generation import Llama
from llama.measure import (  # noqa: F401 (quantization_error: bench.quantization_error)
    PeakMemory, agreement, check_output_path, copy_bandwidth, decode_bytes_per_step, decode_speed, device_name,
    quantization_error, reduce, report, time_generators, tokens_equal_share, weight_bytes,
)
from llama.model import Linear, Transformer
from llama.quantized_linear import native_int8_layers
from llama.random_model import SHAPES, NoTextTokenizer, build_random_model  # noqa: F401 (SHAPES: bench.SHAPES)


# --- runs ----------------------------------------------------------------------------------------


def _check_run_args(prompt_len: int, gen_len: int, batch: int, warmup: int, repeats: int, n_agree: int,
                    max_seq_len: Optional[int], seed: int = 0) -> int:
    """ValueError naming a bad argument; else the model's max_seq_len (default prompt_len + gen_len)."""
    check_seed(seed)
    for name, value, low in (("prompt_len", prompt_len, 1), ("gen_len", gen_len, 2), ("batch", batch, 1),
                             ("warmup", warmup, 0), ("repeats", repeats, 1),
                             ("agreement_prompts", n_agree, 1)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_seq_len is None:
        return prompt_len + gen_len
    if not is_int(max_seq_len) or max_seq_len < prompt_len + gen_len:
        raise ValueError(f"max_seq_len must be an integer >= prompt_len + gen_len = {prompt_len + gen_len}, got {max_seq_len!r}")
    return int(max_seq_len)


def _change_model(model: Transformer, tokenizer, prompts: List[List[int]], batch: int, gen_len: int,
                  dtype: torch.dtype, scheme) -> dict:
    """Cast model to dtype and quantize it (scheme); returns what that costs in accuracy: the greedy tokens of
    the model before (the baseline) on prompts, and the logit error on the prompts' positions (prompts run in
    chunks of the model's batch size)."""
    tokens = Llama(model, tokenizer).generate(prompts, max_gen_len=gen_len, temperature=0.0)[0]
    chunks = [torch.tensor(prompts[i:i + batch], device=model.tok_embeddings.weight.device)
              for i in range(0, len(prompts), batch)]

    def prompt_logits() -> torch.Tensor:
        return torch.cat([model.forward(ids, 0).float() for ids in chunks])

    reference_logits = prompt_logits()
    model.to(dtype)
    if scheme is not None:
        quantization.quantize_model(model, scheme)
    return {"tokens": tokens, "logit_error": quantization_error(reference_logits, prompt_logits())}


def _describe(model: Transformer, n_params: int, device: torch.device, dtype: torch.dtype, world_size: int,
              world: int, settings: dict) -> dict:
    """The results' header: what ran, on what, with which settings."""
    attn = model.layers[0].attention
    return {
        "shape": settings.pop("shape"),
        "model_args": dict(asdict(model.params)),
        "params": n_params,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "world_size": world_size,
        "model_parallel_size": world,
        "per_rank": {
            "weight_bytes": weight_bytes(model),
            "n_local_heads": attn.n_local_heads,
            "n_local_kv_heads": attn.n_local_kv_heads,
            "head_dim": attn.head_dim,
            "ffn_hidden_dim": model.layers[0].feed_forward.w1.weight.shape[0],
            "vocab_slice": model.output.weight.shape[0],
        },
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_kernels": _native_kernels(model),
        **settings,
        "eos": "disabled (eos_id=-1): every row generates exactly gen_len tokens",
        "ours": {},
    }


def _time_batches(results: dict, generators: dict, prompts: List[List[int]], batches: List[int], model: Transformer,
                  baseline_step_bytes: Dict[int, int], device: torch.device) -> None:
    """Time every generator at each batch size; fills results["ours"] (and "hf" with the speedups)."""
    prompt_len, gen_len = results["prompt_len"], results["gen_len"]
    for b in batches:
        # The bytes every rank reads at once: the sum over ranks (kv heads replicated on ranks beyond them count each time).
        step = {k: int(v) for k, v in zip(("weights", "kv", "total"), reduce(
            list(decode_bytes_per_step(model, b, prompt_len, gen_len).values()), device, dist.ReduceOp.SUM))}
        timed = time_generators(generators, prompts[:b], gen_len, device, results["warmup"], results["repeats"])
        t_one, t_all, tokens = timed["ours"]
        ref = results["ours"][str(b)] = {**decode_speed(t_one, t_all, b, prompt_len, gen_len, step["total"]),
                                         "weight_bytes_per_step": step["weights"], "kv_bytes_per_step": step["kv"]}
        if "hf" in generators:
            t_one, t_all, hf_tokens = timed["hf"]
            hf_bytes = int(sum(reduce([baseline_step_bytes[b]], device, dist.ReduceOp.SUM)))
            theirs = results["hf"][str(b)] = decode_speed(t_one, t_all, b, prompt_len, gen_len, hf_bytes)
            ok = ref["decode_tok_s"] and theirs["decode_tok_s"]
            results["speedup_decode"][str(b)] = ref["decode_tok_s"] / theirs["decode_tok_s"] if ok else None
            results["speedup_e2e"][str(b)] = ref["e2e_tok_s"] / theirs["e2e_tok_s"]
            results["hf_tokens_match"][str(b)] = tokens_equal_share(tokens, hf_tokens)


def _untimed_runs(results: dict, memory: PeakMemory, ours: Callable, prompts: List[List[int]], batches: List[int],
                  device: torch.device) -> None:
    """Untimed runs first, which also give the peak memory of our generation alone: the model and
    its cache stay counted, the accuracy measurements before are not. The first call's time is kept:
    with --compile it is what compiling the decode step (or loading it from the compile cache) costs."""
    memory.restart()
    for b in batches:
        for _ in range(max(results["warmup"], 1)):
            start = time.perf_counter()
            ours(prompts[:b], results["gen_len"])
            results.setdefault("first_call_s", time.perf_counter() - start)
    results["peak_memory_bytes"] = int(max(reduce([memory.peak()], device, dist.ReduceOp.MAX)))
    ranks = results["world_size"] > 1
    results["peak_memory_method"] = memory.method + (" (the largest over ranks)" if ranks else "")


def _add_bandwidth(results: dict, bandwidth_start: float, device: torch.device) -> None:
    """The copy bandwidth (the better of the start's and the end's) and each run's share of it.

    Measured again at the end: on some machines a copy's speed changes from one measurement to the
    next (on a 2-core VM here, 47 or 83 GB/s), so the better of the two stands for the device's."""
    bandwidth_end = sum(reduce([copy_bandwidth(device)], device, dist.ReduceOp.SUM))
    bandwidth = max(bandwidth_start, bandwidth_end)
    results["copy_bandwidth_gbs"] = bandwidth / 1e9
    results["copy_bandwidth_gbs_start_end"] = [bandwidth_start / 1e9, bandwidth_end / 1e9]
    for runs in (results["ours"], results.get("hf", {})):
        for run_ in runs.values():
            if isinstance(run_, dict) and run_.get("achieved_gbs"):
                run_["bandwidth_pct"] = 100.0 * run_["achieved_gbs"] * 1e9 / bandwidth


def _setup(device, dtype, baseline_dtype, quantize, compare_hf: bool):
    """The device, dtypes and quantization scheme resolved and checked, and the model-parallel group set up:
    (device, dtype, baseline_dtype, scheme, model-parallel size, world size)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    baseline_dtype = dtype if baseline_dtype is None else resolve_dtype(baseline_dtype, device)
    scheme = quantization.parse_quantize(quantize)
    if scheme is not None:
        quantization.check_support(scheme, device, dtype)
    world = setup_model_parallel(device, None)
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if compare_hf and world > 1:
        raise ValueError("--compare_hf runs in a single process only (transformers' model is not split over ranks)")
    return device, dtype, baseline_dtype, scheme, world, world_size


def run(shape: str = "134M", device: Optional[str] = None, dtype: Optional[str] = None, prompt_len: int = 128,
        gen_len: int = 64, batch: int = 8, compare_hf: bool = False, warmup: int = 1, repeats: int = 3, seed: int = 0,
        compile: bool = False, quantize: Optional[str] = None, baseline_dtype: Optional[str] = None,
        max_seq_len: Optional[int] = None, agreement_prompts: Optional[int] = None,
        compare_llamacpp: Union[bool, str, None] = None, llamacpp_dir: Optional[str] = None,
        llamacpp_tokenizer: Optional[str] = None) -> dict:
    """Run the benchmark and return its results (see main for the arguments)."""
    n_agree = batch if agreement_prompts is None else agreement_prompts
    max_seq_len = _check_run_args(prompt_len, gen_len, batch, warmup, repeats, n_agree, max_seq_len, seed)
    device, dtype, baseline_dtype, scheme, world, world_size = _setup(device, dtype, baseline_dtype, quantize, compare_hf)
    llamacpp = llamacpp_baseline.locate(compare_llamacpp, llamacpp_dir, llamacpp_tokenizer, shape, device, world, dtype,
                                        scheme)  # None without --compare_llamacpp; checked before any work

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    bandwidth_start = sum(reduce([copy_bandwidth(device)], device, dist.ReduceOp.SUM))
    memory = PeakMemory(device)
    batches = sorted({1, batch})
    # Built in the baseline dtype, which transformers and the reference tokens use; then cast and quantized.
    model = build_random_model(shape, device, baseline_dtype, max_seq_len, max(batches), seed)
    n_params = int(sum(reduce([sum(p.numel() for p in model.parameters())], device, dist.ReduceOp.SUM)))
    tokenizer = NoTextTokenizer(model.vocab_size)
    # llama.cpp runs first, on the weights as made (before any cast or quantization).
    llamacpp_results = llamacpp_baseline.measure(model, llamacpp, prompt_len, gen_len, batches, repeats, dtype)
    g = torch.Generator().manual_seed(seed)  # the same prompts on every rank
    prompts = torch.randint(0, model.vocab_size, (max(batch, n_agree), prompt_len), generator=g).tolist()
    hf = hf_baseline.hf_model(model, baseline_dtype, device) if compare_hf else None
    # transformers reads the baseline weights each step: their bytes, before any cast or quantization.
    baseline_step_bytes = {b: decode_bytes_per_step(model, b, prompt_len, gen_len)["total"] for b in batches}
    baseline = None
    if scheme is not None or dtype != baseline_dtype:
        baseline = _change_model(model, tokenizer, prompts[:n_agree], batch, gen_len, dtype, scheme)
    generator = Llama(model, tokenizer, **({"compile": True} if compile else {}))

    def ours(p, n):
        return generator.generate(p, max_gen_len=n, temperature=0.0)[0]

    settings = dict(shape=shape, prompt_len=prompt_len, gen_len=gen_len, max_seq_len=max_seq_len, batch=batch,
                    warmup=warmup, repeats=repeats, compile=compile, quantize=scheme.name if scheme is not None else None,
                    baseline_dtype=str(baseline_dtype).removeprefix("torch."))
    results = _describe(model, n_params, device, dtype, world_size, world, settings)
    _untimed_runs(results, memory, ours, prompts, batches, device)
    if generator.decode_step is not None:
        results["decode_step_route"] = generator.decode_step.routes
    generators = {"ours": ours}
    if hf is not None:
        import transformers

        generators["hf"] = hf_baseline.generator(hf, device)
        results["hf"] = {"transformers": transformers.__version__, "attn_implementation": "sdpa"}
        results["speedup_decode"], results["speedup_e2e"], results["hf_tokens_match"] = {}, {}, {}
    _time_batches(results, generators, prompts, batches, model, baseline_step_bytes, device)
    llamacpp_baseline.add_results(results, llamacpp_results)
    if baseline is not None:
        # The generator as timed (compiled, quantized...) on the agreement prompts, untimed.
        results["baseline_agreement"] = agreement(ours(prompts[:n_agree], gen_len), baseline["tokens"], min(16, gen_len))
        results["logit_error"] = baseline["logit_error"]
    _add_bandwidth(results, bandwidth_start, device)
    results["ttft_s"], results["prefill_tok_s"] = results["ours"]["1"]["ttft_s"], results["ours"]["1"]["prefill_tok_s"]
    if load_start is not None:
        # Other work on the machine slows every number here: the 1-minute load averages tell of it.
        results["load_average_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    return results


# --- output --------------------------------------------------------------------------------------


def _native_kernels(model: Transformer) -> Optional[str]:
    """Which of the model's matmuls run on llama's own kernels (llama/native.py), in words, or None."""
    kinds = []
    if native_int8_layers(model):
        kinds.append("int8")
    if any(isinstance(m, Linear) and m.native_bf16() for m in model.modules()):
        kinds.append("bfloat16")
    return " and ".join(kinds) or None


def _header_lines(r: dict) -> List[str]:
    pr = r["per_rank"]
    lines = [
        f"llama.bench: shape {r['shape']} ({r['params'] / 1e6:.1f}M parameters), {r['dtype']}"
        f"{', weights ' + r['quantize'] if r.get('quantize') else ''}, device {r['device']}: {r['device_name']}",
        f"torch {r['torch']}, world size {r['world_size']} (model-parallel {r['model_parallel_size']}), "
        f"prompt {r['prompt_len']} tokens, {r['gen_len']} generated, max_seq_len {r['max_seq_len']}, greedy, EOS disabled, "
        f"{'compiled decode step, ' if r['compile'] else ''}"
        f"best of {r['repeats']} after {r['warmup']} warm-up",
    ]
    if r.get("native_kernels"):
        lines.append(f"{r['native_kernels']} matmuls on llama's native AVX2 kernels (LLAMA_NATIVE_KERNELS=off for torch's)")
    if r["model_parallel_size"] > 1:
        lines.append(
            f"per rank: {pr['weight_bytes'] / 1e6:.1f} MB of weights, {pr['n_local_heads']} heads, "
            f"{pr['n_local_kv_heads']} kv heads of {pr['head_dim']}, ffn {pr['ffn_hidden_dim']}, output rows {pr['vocab_slice']}"
        )
    lines.append(
        f"copy bandwidth {r['copy_bandwidth_gbs']:.1f} GB/s (read + written{', sum over ranks' if r['world_size'] > 1 else ''}), "
        f"peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_method']})"
    )
    if r["compile"]:
        lines.append(f"first generate call {r['first_call_s']:.1f} s (it compiles the decode step, or loads it from the compile "
                     f"cache: see LLAMA_COMPILE_CACHE)")
        if r.get("decode_step_route"):
            lines.append(f"decode step compiled {r['decode_step_route']}")
    if "load_average_1min" in r:
        load = r["load_average_1min"]
        lines.append(f"1-minute load average {load['start']:.2f} at the start, {load['end']:.2f} at the end "
                     f"(this run's own threads count; more than that is other work, which slows every figure)")
    if r.get("hf"):
        lines.append(f"compared with transformers {r['hf']['transformers']} LlamaForCausalLM.generate (sdpa, default cache), "
                     f"same weights in {r['baseline_dtype']}")
    return lines + [""]


def _fmt(value, how: str) -> str:
    if value is None:
        return "-"
    if how == "ms":
        return f"{value * 1e3:.1f}"
    if how == "MB":
        return f"{value / 1e6:.0f}"
    return how.format(value)


def _speed_lines(r: dict) -> List[str]:
    """The table of speeds: ours, and transformers' with the ratio where it ran."""
    hf = r.get("hf")
    rows = [("prefill tok/s (batch 1)", "prefill_tok_s", "1", "{:.0f}"), ("time to first token ms (batch 1)", "ttft_s", "1", "ms")]
    for b in sorted(r["ours"], key=int):
        rows += [
            (f"decode tok/s, batch {b}", "decode_tok_s", b, "{:.1f}"),
            (f"  decode step ms, batch {b}", "decode_step_s", b, "ms"),
            (f"  end-to-end tok/s, batch {b}", "e2e_tok_s", b, "{:.1f}"),
            (f"  MB read per step, batch {b}", "bytes_per_step", b, "MB"),
            (f"  achieved GB/s, batch {b}", "achieved_gbs", b, "{:.2f}"),
            (f"  % of copy bandwidth, batch {b}", "bandwidth_pct", b, "{:.0f}%"),
        ]
    lines = [f"{'':36}{'ours':>12}" + (f"{'HF':>12}{'ours/HF':>10}" if hf else "")]
    for label, key, b, how in rows:
        ours = r["ours"][b].get(key)
        line = f"{label:36}{_fmt(ours, how):>12}"
        if hf:
            theirs = hf[b].get(key)
            ratio = ""
            if ours and theirs and key in ("decode_tok_s", "e2e_tok_s", "prefill_tok_s"):
                ratio = f"{ours / theirs:.2f}x"
            elif ours and theirs and key in ("ttft_s", "decode_step_s"):
                ratio = f"{theirs / ours:.2f}x"
            line += f"{_fmt(theirs, how):>12}{ratio:>10}"
        lines.append(line)
    return lines


def _accuracy_lines(r: dict) -> List[str]:
    lines = []
    if r.get("hf"):
        match = ", ".join(f"batch {b}: {100 * r['hf_tokens_match'][b]:.0f}%" for b in sorted(r["ours"], key=int))
        lines.append(f"greedy tokens equal to transformers': {match}")
    if "baseline_agreement" in r:
        agree = r["baseline_agreement"]
        lines.append(
            f"against the {r['baseline_dtype']} model, greedy, {agree['prompts']} prompts: rows whose first "
            f"{agree['first_n']} tokens are equal {100 * agree['rows_first_n_equal']:.0f}%, tokens equal "
            f"{100 * agree['tokens_equal']:.0f}%, tokens before the first difference {agree['mean_tokens_before_first_difference']:.1f} on average"
        )
        e = r["logit_error"]
        lines.append(
            f"logit error on the prompts: max {e['max_abs']:.4f}, mean {e['mean_abs']:.4f} (logit std "
            f"{e['reference_logit_std']:.2f}), top-1 agreement {100 * e['top1_agreement']:.1f}%"
        )
    return lines


def format_table(r: dict) -> str:
    """A readable summary of run()'s results."""
    return "\n".join(_header_lines(r) + _speed_lines(r) + llamacpp_baseline.table_lines(r) + _accuracy_lines(r))


def main(shape: str = "134M", device: Optional[str] = None, dtype: Optional[str] = None, prompt_len: int = 128,
         gen_len: int = 64, batch: int = 8, compare_hf: bool = False, json: Optional[str] = None, warmup: int = 1,
         repeats: int = 3, seed: int = 0, compile: bool = False, quantize: Optional[str] = None,
         baseline_dtype: Optional[str] = None, max_seq_len: Optional[int] = None,
         agreement_prompts: Optional[int] = None, compare_llamacpp: Union[bool, str, None] = None,
         llamacpp_dir: Optional[str] = None, llamacpp_tokenizer: Optional[str] = None) -> dict:
    """Benchmark generation on a random model (no weights needed); print a table (rank 0) and optionally write JSON.

    Args:
        shape: The model's shape: tiny, 134M, 7B, 13B or 70B.
        device: cuda, cpu or mps; by default the best available.
        dtype: float32, float16 or bfloat16; by default the device's (float32 on the CPU).
        prompt_len: Tokens in each (random) prompt.
        gen_len: Tokens generated for each prompt, at least 2.
        batch: The larger batch timed besides batch 1.
        compare_hf: Also time transformers' LlamaForCausalLM.generate on the same weights.
        json: A file to write every figure to as JSON (by rank 0); its folder must exist.
        warmup: Untimed runs before each measurement.
        repeats: Timed runs of each measurement; the fastest is reported.
        seed: Seeds the random weights and prompts.
        compile: Generate through the torch.compile'd decode step.
        quantize: int8, w8a8 or int4[-gN] to time the model with quantized weights (see llama/quantize.py); by default none.
        baseline_dtype: The dtype the random weights are made in (by default dtype), in which transformers runs and
            against which, when dtype differs or quantize is set, greedy-token agreement and logit error are reported.
        max_seq_len: The context the model and its KV cache are built for; by default prompt_len + gen_len.
        agreement_prompts: How many prompts the agreement with the baseline is measured on; by default batch.
        compare_llamacpp: Also time llama.cpp on the same weights (CPU only): its llama-bench binary, or the bare flag
            to look on PATH and in $LLAMA_CPP_DIR/build/bin (skipped, saying why, when not found).
        llamacpp_dir: llama.cpp's source directory (its converter); by default llama-bench's, else $LLAMA_CPP_DIR.
        llamacpp_tokenizer: A tokenizer.model of the model's vocabulary for the GGUF file; by default a stand-in.
    """
    json = check_output_path(json)
    results = run(shape, device, dtype, prompt_len, gen_len, batch, compare_hf, warmup, repeats, seed, compile,
                  quantize, baseline_dtype, max_seq_len, agreement_prompts, compare_llamacpp, llamacpp_dir,
                  llamacpp_tokenizer)
    if global_rank() == 0:
        report(format_table(results), results, json)
    return results


if __name__ == "__main__":
    from llama.cli import run as run_cli

    run_cli(main, serialize=lambda result: None)  # the table is the output, not the returned dict
