"""Inference benchmark on a random model of a named shape: no weights or tokenizer needed.

    python -m llama.bench --shape 134M --device cpu --dtype float32 --compare_hf
    torchrun --nproc_per_node 2 -m llama.bench --shape 7B --device cuda

It times the real generation path (Llama.generate, greedy) on random prompt token ids and reports
prefill speed, time to first token, decode speed at batch 1 and at --batch, peak memory, the bytes
each decode step must read, and the bandwidth that achieves as a share of the device's own copy
bandwidth measured in the same run. With --compare_hf it times transformers' LlamaForCausalLM.generate
on the very same weights. See the "Performance" section of README.md for how each number is defined.
"""

import ctypes
import gc
import json as _json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from llama.distributed import (
    global_rank,
    model_parallel_rank,
    model_parallel_world_size,
    resolve_device,
    resolve_dtype,
    setup_model_parallel,
)
from llama import quantize as quantization
from llama.generation import Llama
from llama.model import ModelArgs, Transformer

# Llama 2's published shapes, a GPT-2-small-sized one that a CPU runs in minutes, and one for tests.
SHAPES: Dict[str, dict] = {
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512, "multiple_of": 32},
    "134M": {"dim": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 32000, "multiple_of": 256},
    "7B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000, "multiple_of": 256},
    "13B": {"dim": 5120, "n_layers": 40, "n_heads": 40, "vocab_size": 32000, "multiple_of": 256},
    "70B": {
        "dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 32000,
        "multiple_of": 4096, "ffn_dim_multiplier": 1.3,
    },
}


class _NoTextTokenizer:
    """What Llama.generate needs of a tokenizer when it is given token ids and no stop strings.

    eos_id is -1: a generated token is an argmax index (>= 0), so it is never EOS and every row runs
    for exactly max_gen_len tokens, which keeps the work per run fixed. pad_id (-1, as Llama 2's) only
    fills positions past the prompts, and every prompt of a run has the same length.
    """

    def __init__(self, n_words: int):
        self.n_words = n_words
        self.bos_id, self.eos_id, self.pad_id = 1, -1, -1

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


# --- the model -----------------------------------------------------------------------------------


def build_random_model(shape: str, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                       max_batch_size: int, seed: int = 0) -> Transformer:
    """A Transformer of a named shape with random weights, split over the model-parallel group if one is set up.

    The model is built on the meta device, given uninitialised storage of the target dtype on the
    target device, and filled in place, so no weight exists twice or in another dtype. Each weight
    matrix is N(0, 1/in_features), the embedding N(0, 1) and the norms 1, which keeps activations
    O(1) in any dtype; the output layer is 4x larger so that greedy choices are clear-cut.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {list(SHAPES)}")
    args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed + 1000 * model_parallel_rank())
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or name.endswith("cache"):
                continue
            if weight.ndim == 1:  # RMSNorm
                weight.fill_(1.0)
            elif name == "tok_embeddings":
                weight.normal_(0.0, 1.0, generator=g)
            else:
                in_features = getattr(module, "in_features", weight.shape[1])
                scale = 4.0 if name == "output" else 1.0
                weight.normal_(0.0, scale * in_features ** -0.5, generator=g)
    model.setup_cache()
    return model.eval()


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _weight_bytes(model: Transformer) -> int:
    """The bytes of the weights as stored: quantized weights and their scales included, the KV cache not."""
    return sum(_bytes(t) for t in model.state_dict().values())


def _tokens_equal_share(tokens: List[List[int]], reference: List[List[int]]) -> float:
    """The share of all generated tokens equal to the reference's at the same place."""
    return sum(x == y for t, r in zip(tokens, reference) for x, y in zip(t, r)) / sum(len(r) for r in reference)


def _agreement(tokens: List[List[int]], reference: List[List[int]], n: int) -> Dict[str, float]:
    """Greedy agreement of rows of tokens with the reference's: the share of rows equal on their first
    n tokens, the share of all tokens equal, and how many tokens come before a row's first difference."""
    first_difference = [next((i for i, (x, y) in enumerate(zip(t, r)) if x != y), len(r)) for t, r in zip(tokens, reference)]
    return {
        "prompts": len(reference),
        "first_n": n,
        "rows_first_n_equal": sum(d >= n for d in first_difference) / len(reference),
        "tokens_equal": _tokens_equal_share(tokens, reference),
        "mean_tokens_before_first_difference": sum(first_difference) / len(reference),
    }


def quantization_error(reference_logits: torch.Tensor, logits: torch.Tensor) -> Dict[str, float]:
    """Max and mean absolute logit difference, and how often the top-1 token agrees, over every position."""
    diff = (logits - reference_logits).abs()
    top1 = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "top1_agreement": top1.item(),
            "reference_logit_std": reference_logits.std().item()}


def decode_bytes_per_step(model: Transformer, batch: int, prompt_len: int, gen_len: int) -> Dict[str, int]:
    """The bytes one decode step of this rank must read: its weights and the KV cache so far.

    Every weight is read once per step, except the embedding table, of which only the batch's rows
    are. The decode steps of a run start at positions prompt_len .. prompt_len + gen_len - 2 and each
    reads the keys and values of every position up to its own, prompt_len + gen_len / 2 on average.
    Activations and the new cache entries written are left out (they are tiny beside these).
    """
    emb = model.tok_embeddings.weight
    weights = _weight_bytes(model) - _bytes(emb) + batch * emb.shape[1] * emb.element_size()
    attn = model.layers[0].attention
    avg_positions = prompt_len + gen_len / 2
    kv = 2 * model.n_layers * batch * attn.n_local_kv_heads * attn.head_dim * avg_positions * emb.element_size()
    return {"weights": int(weights), "kv": int(kv), "total": int(weights + kv)}


# --- timing helpers ------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _time(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Wall-clock seconds of each of repeats calls of fn (after warmup untimed ones), the device synchronised
    around each, and under torchrun all ranks starting together."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _reduce(values: List[float], device: torch.device, op) -> List[float]:
    """values reduced over all ranks (op: dist.ReduceOp), or as they are in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t, op=op)
    return t.tolist()


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, repeats: int = 5) -> float:
    """The device's memory bandwidth in bytes/s: the best of repeats copies of a large tensor,
    counting the bytes read plus the bytes written. Under torchrun all ranks copy at once."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = min(_time(lambda: dst.copy_(src), device, warmup=1, repeats=repeats))
    del src, dst
    return 2 * nbytes / best


# --- memory --------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """The peak memory of a stretch of work, above what was in use when the object was made.

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): the resident set's high-water mark (VmHWM),
    reset through /proc/self/clear_refs where the kernel allows it, less the resident set at the
    start; elsewhere getrusage's maximum RSS, which cannot be reset. Memory freed by earlier work is
    given back to the system first (glibc's malloc_trim), or reusing it would not count.
    restart() forgets the peaks so far (not what is still in use): work between the start and
    restart(), once freed, does not count.
    """

    def __init__(self, device: torch.device):
        self.device = device
        can_reset = self.restart()
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
            self.start = torch.cuda.memory_allocated(device)
        else:
            self.method = "VmHWM" if can_reset else "getrusage ru_maxrss"
            rss = _proc_status_kb("VmRSS")
            self.start = rss * 1024 if rss is not None else self._rusage()

    def restart(self) -> bool:
        """Forget the peaks so far; False where they cannot be forgotten (getrusage)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        gc.collect()
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def _rusage() -> int:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb if sys.platform == "darwin" else kb * 1024  # bytes on macOS, kB elsewhere

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.start
        hwm = _proc_status_kb("VmHWM") if self.method == "VmHWM" else None
        return (hwm * 1024 if hwm is not None else self._rusage()) - self.start


# --- runs ----------------------------------------------------------------------------------------


def _speed(t_one: List[float], t_all: List[float], batch: int, prompt_len: int, gen_len: int,
           step_bytes: Optional[int]) -> dict:
    """Speeds from the times of generating 1 token and gen_len tokens for batch prompts.

    A run of gen_len tokens is one prefill (which gives the first token) and gen_len - 1 decode
    steps, so a decode step takes (best long run - best 1-token run) / (gen_len - 1). The best of
    the repeats is taken because interference (other processes, a descheduled thread) only ever adds
    time; every time is kept in the results. Where noise leaves the long runs no slower than the
    short ones, the decode figures are None.
    """
    first, whole = min(t_one), min(t_all)
    step = (whole - first) / (gen_len - 1) if whole > first else None
    out = {
        "batch": batch,
        "ttft_s": first,
        "prefill_tok_s": batch * prompt_len / first,
        "total_s": whole,
        "decode_step_s": step,
        "decode_tok_s": batch / step if step else None,
        "e2e_tok_s": batch * gen_len / whole,
        "times_first_s": t_one,
        "times_total_s": t_all,
    }
    if step_bytes is not None:
        out["bytes_per_step"] = step_bytes
        out["achieved_gbs"] = step_bytes / step / 1e9 if step else None
    return out


def _bench_generate(generators: Dict[str, Callable[[List[List[int]], int], List[List[int]]]], prompts: List[List[int]],
                    gen_len: int, device: torch.device, warmup: int, repeats: int) -> Dict[str, tuple]:
    """{name: (times of 1-token runs, times of gen_len-token runs, the tokens of the last long run)}.

    The generators take turns within each repeat, so that other load on the machine falls on all alike.
    """
    tokens: Dict[str, List[List[int]]] = {}
    times = {name: ([], []) for name in generators}
    for i in range(warmup + repeats):
        for which, n in enumerate((1, gen_len)):
            for name, generate in generators.items():
                def run():
                    tokens[name] = generate(prompts, n)

                t = _time(run, device, warmup=0, repeats=1)[0]
                if i >= warmup:
                    times[name][which].append(t)
    for name, rows in tokens.items():
        lengths = {len(t) for t in rows}
        if lengths != {gen_len}:
            raise RuntimeError(f"{name}: generation gave {sorted(lengths)} new tokens per row, not {gen_len}: the timing would be wrong")
    return {name: (t_one, t_all, tokens[name]) for name, (t_one, t_all) in times.items()}


def _hf_model(model: Transformer, dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM holding the weights of model (wq and wk rows reordered, the rest shared)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama.hf import config_from_params, meta_rows_to_hf, meta_to_hf_name

    p = model.params
    params = {k: v for k, v in asdict(p).items() if k not in ("max_batch_size", "max_seq_len")}
    config = LlamaConfig(**config_from_params(params, p.vocab_size, dtype, max_position_embeddings=max(p.max_seq_len, 4096)))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    state = {}
    for name, t in model.state_dict().items():
        kind = name.split(".")[-2] if name.startswith("layers.") else None
        state[meta_to_hf_name(name)] = meta_rows_to_hf(t, p.head_dim).contiguous() if kind in ("wq", "wk") else t
    hf.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (the rotary inverse frequencies) are not in a state dict: rebuild them.
    for name, module in list(hf.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
            parent_name, _, attr = name.rpartition(".")
            with torch.device(device):
                setattr(hf.get_submodule(parent_name), attr, type(module)(config=config))
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers' model still has tensors on the meta device: {left[:5]}")
    hf.generation_config.eos_token_id = None  # as ours: no EOS, every row generates exactly max_new_tokens
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def _hf_generate(hf, device: torch.device) -> Callable[[List[List[int]], int], List[List[int]]]:
    def generate(prompts: List[List[int]], n: int) -> List[List[int]]:
        ids = torch.tensor(prompts, dtype=torch.long, device=device)
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                min_new_tokens=n, use_cache=True,
                # Sampling settings off explicitly: a config that set them would only warn with do_sample=False.
                temperature=None, top_p=None, top_k=None,
            )
        return out[:, ids.shape[1]:].tolist()

    return generate


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (MPS)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs visible), {platform.machine()}"


def run(
    shape: str = "134M",
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    prompt_len: int = 128,
    gen_len: int = 64,
    batch: int = 8,
    compare_hf: bool = False,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    compile: bool = False,
    quantize: Optional[str] = None,
    baseline_dtype: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    agreement_prompts: Optional[int] = None,
) -> dict:
    """Run the benchmark and return its results (see main for the arguments)."""
    n_agree = batch if agreement_prompts is None else agreement_prompts
    for name, value, low in (("prompt_len", prompt_len, 1), ("gen_len", gen_len, 2), ("batch", batch, 1),
                             ("warmup", warmup, 0), ("repeats", repeats, 1),
                             ("agreement_prompts", n_agree, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_seq_len is None:
        max_seq_len = prompt_len + gen_len
    elif not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < prompt_len + gen_len:
        raise ValueError(f"max_seq_len must be an integer >= prompt_len + gen_len = {prompt_len + gen_len}, got {max_seq_len!r}")
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

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    bandwidth_start = sum(_reduce([copy_bandwidth(device)], device, dist.ReduceOp.SUM))
    memory = PeakMemory(device)
    batches = sorted({1, batch})
    # Built in the baseline dtype, which transformers and the reference tokens use; then cast and quantized.
    model = build_random_model(shape, device, baseline_dtype, max_seq_len, max(batches), seed)
    n_params = int(sum(_reduce([sum(p.numel() for p in model.parameters())], device, dist.ReduceOp.SUM)))
    tokenizer = _NoTextTokenizer(model.vocab_size)
    g = torch.Generator().manual_seed(seed)  # the same prompts on every rank
    prompts = torch.randint(0, model.vocab_size, (max(batch, n_agree), prompt_len), generator=g).tolist()
    hf = _hf_model(model, baseline_dtype, device) if compare_hf else None
    # transformers reads the baseline weights each step: their bytes, before any cast or quantization.
    baseline_step_bytes = {b: decode_bytes_per_step(model, b, prompt_len, gen_len)["total"] for b in batches}
    baseline = None
    if scheme is not None or dtype != baseline_dtype:
        # What the change costs in accuracy: the eager baseline model's greedy tokens and logits on the same
        # prompts (n_agree of them, in chunks of the model's batch size).
        agree_prompts = prompts[:n_agree]
        baseline = {"tokens": Llama(model, tokenizer).generate(agree_prompts, max_gen_len=gen_len, temperature=0.0)[0]}
        chunks = [torch.tensor(agree_prompts[i:i + batch], device=device) for i in range(0, n_agree, batch)]

        def prompt_logits() -> torch.Tensor:
            return torch.cat([model.forward(ids, 0).float() for ids in chunks])

        reference_logits = prompt_logits()
        model.to(dtype)
        if scheme is not None:
            quantization.quantize_model(model, scheme)
        baseline["logit_error"] = quantization_error(reference_logits, prompt_logits())
        del reference_logits
    generator = Llama(model, tokenizer, **({"compile": True} if compile else {}))

    def ours(p, n):
        return generator.generate(p, max_gen_len=n, temperature=0.0)[0]

    local_weight_bytes = _weight_bytes(model)
    attn = model.layers[0].attention
    results = {
        "shape": shape,
        "model_args": {k: v for k, v in asdict(model.params).items()},
        "params": n_params,
        "device": str(device),
        "device_name": _device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "world_size": world_size,
        "model_parallel_size": world,
        "per_rank": {
            "weight_bytes": local_weight_bytes,
            "n_local_heads": attn.n_local_heads,
            "n_local_kv_heads": attn.n_local_kv_heads,
            "head_dim": attn.head_dim,
            "ffn_hidden_dim": model.layers[0].feed_forward.w1.weight.shape[0],
            "vocab_slice": model.output.weight.shape[0],
        },
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "max_seq_len": max_seq_len,
        "batch": batch,
        "warmup": warmup,
        "repeats": repeats,
        "compile": compile,
        "quantize": scheme.name if scheme is not None else None,
        "baseline_dtype": str(baseline_dtype).removeprefix("torch."),
        "eos": "disabled (eos_id=-1): every row generates exactly gen_len tokens",
        "ours": {},
    }
    # Untimed runs first, which also give the peak memory of our generation alone: the model and
    # its cache stay counted, the accuracy measurements before are not.
    memory.restart()
    for b in batches:
        for _ in range(max(warmup, 1)):
            ours(prompts[:b], gen_len)
    peak = memory.peak()
    results["peak_memory_bytes"] = int(max(_reduce([peak], device, dist.ReduceOp.MAX)))
    results["peak_memory_method"] = memory.method + (" (the largest over ranks)" if world_size > 1 else "")

    generators = {"ours": ours}
    if compare_hf:
        import transformers

        generators["hf"] = _hf_generate(hf, device)
        results["hf"] = {"transformers": transformers.__version__, "attn_implementation": "sdpa"}
        results["speedup_decode"], results["speedup_e2e"], results["hf_tokens_match"] = {}, {}, {}
    for b in batches:
        # The bytes every rank reads at once: the sum over ranks (kv heads replicated on ranks beyond them count each time).
        step = {k: int(v) for k, v in zip(("weights", "kv", "total"), _reduce(
            list(decode_bytes_per_step(model, b, prompt_len, gen_len).values()), device, dist.ReduceOp.SUM))}
        timed = _bench_generate(generators, prompts[:b], gen_len, device, warmup, repeats)
        t_one, t_all, tokens = timed["ours"]
        ref = results["ours"][str(b)] = {**_speed(t_one, t_all, b, prompt_len, gen_len, step["total"]),
                                         "weight_bytes_per_step": step["weights"], "kv_bytes_per_step": step["kv"]}
        if compare_hf:
            t_one, t_all, hf_tokens = timed["hf"]
            hf_bytes = int(sum(_reduce([baseline_step_bytes[b]], device, dist.ReduceOp.SUM)))
            theirs = results["hf"][str(b)] = _speed(t_one, t_all, b, prompt_len, gen_len, hf_bytes)
            ok = ref["decode_tok_s"] and theirs["decode_tok_s"]
            results["speedup_decode"][str(b)] = ref["decode_tok_s"] / theirs["decode_tok_s"] if ok else None
            results["speedup_e2e"][str(b)] = ref["e2e_tok_s"] / theirs["e2e_tok_s"]
            results["hf_tokens_match"][str(b)] = _tokens_equal_share(tokens, hf_tokens)
    if baseline is not None:
        # The generator as timed (compiled, quantized...) on the agreement prompts, untimed.
        results["baseline_agreement"] = _agreement(ours(prompts[:n_agree], gen_len), baseline["tokens"], min(16, gen_len))
        results["logit_error"] = baseline["logit_error"]
    # Measured again at the end: on some machines a copy's speed changes from one measurement to the
    # next (on a 2-core VM here, 47 or 83 GB/s), so the better of the two stands for the device's.
    bandwidth_end = sum(_reduce([copy_bandwidth(device)], device, dist.ReduceOp.SUM))
    bandwidth = max(bandwidth_start, bandwidth_end)
    results["copy_bandwidth_gbs"] = bandwidth / 1e9
    results["copy_bandwidth_gbs_start_end"] = [bandwidth_start / 1e9, bandwidth_end / 1e9]
    for runs in (results["ours"], results.get("hf", {})):
        for run_ in runs.values():
            if isinstance(run_, dict) and run_.get("achieved_gbs"):
                run_["bandwidth_pct"] = 100.0 * run_["achieved_gbs"] * 1e9 / bandwidth
    first = results["ours"]["1"]
    results["ttft_s"], results["prefill_tok_s"] = first["ttft_s"], first["prefill_tok_s"]
    if load_start is not None:
        # Other work on the machine slows every number here: the 1-minute load averages tell of it.
        results["load_average_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    return results


# --- output --------------------------------------------------------------------------------------


def format_table(r: dict) -> str:
    """A readable summary of run()'s results."""
    batches = sorted(r["ours"], key=int)
    hf = r.get("hf")
    pr = r["per_rank"]
    lines = [
        f"llama.bench: shape {r['shape']} ({r['params'] / 1e6:.1f}M parameters), {r['dtype']}"
        f"{', weights ' + r['quantize'] if r.get('quantize') else ''}, device {r['device']}: {r['device_name']}",
        f"torch {r['torch']}, world size {r['world_size']} (model-parallel {r['model_parallel_size']}), "
        f"prompt {r['prompt_len']} tokens, {r['gen_len']} generated, max_seq_len {r['max_seq_len']}, greedy, EOS disabled, "
        f"{'compiled decode step, ' if r['compile'] else ''}"
        f"best of {r['repeats']} after {r['warmup']} warm-up",
    ]
    if r["model_parallel_size"] > 1:
        lines.append(
            f"per rank: {pr['weight_bytes'] / 1e6:.1f} MB of weights, {pr['n_local_heads']} heads, "
            f"{pr['n_local_kv_heads']} kv heads of {pr['head_dim']}, ffn {pr['ffn_hidden_dim']}, output rows {pr['vocab_slice']}"
        )
    lines.append(
        f"copy bandwidth {r['copy_bandwidth_gbs']:.1f} GB/s (read + written{', sum over ranks' if r['world_size'] > 1 else ''}), "
        f"peak memory {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_method']})"
    )
    if "load_average_1min" in r:
        load = r["load_average_1min"]
        lines.append(f"1-minute load average {load['start']:.2f} at the start, {load['end']:.2f} at the end "
                     f"(this run's own threads count; more than that is other work, which slows every figure)")
    if hf:
        lines.append(f"compared with transformers {hf['transformers']} LlamaForCausalLM.generate (sdpa, default cache), "
                     f"same weights in {r['baseline_dtype']}")
    lines.append("")

    rows = [("prefill tok/s (batch 1)", "prefill_tok_s", "1", "{:.0f}"), ("time to first token ms (batch 1)", "ttft_s", "1", "ms")]
    for b in batches:
        rows += [
            (f"decode tok/s, batch {b}", "decode_tok_s", b, "{:.1f}"),
            (f"  decode step ms, batch {b}", "decode_step_s", b, "ms"),
            (f"  end-to-end tok/s, batch {b}", "e2e_tok_s", b, "{:.1f}"),
            (f"  MB read per step, batch {b}", "bytes_per_step", b, "MB"),
            (f"  achieved GB/s, batch {b}", "achieved_gbs", b, "{:.2f}"),
            (f"  % of copy bandwidth, batch {b}", "bandwidth_pct", b, "{:.0f}%"),
        ]

    def fmt(value, how):
        if value is None:
            return "-"
        if how == "ms":
            return f"{value * 1e3:.1f}"
        if how == "MB":
            return f"{value / 1e6:.0f}"
        return how.format(value)

    header = f"{'':36}{'ours':>12}" + (f"{'HF':>12}{'ours/HF':>10}" if hf else "")
    lines.append(header)
    for label, key, b, how in rows:
        ours = r["ours"][b].get(key)
        line = f"{label:36}{fmt(ours, how):>12}"
        if hf:
            theirs = hf[b].get(key)
            ratio = ""
            if ours and theirs and key in ("decode_tok_s", "e2e_tok_s", "prefill_tok_s"):
                ratio = f"{ours / theirs:.2f}x"
            elif ours and theirs and key in ("ttft_s", "decode_step_s"):
                ratio = f"{theirs / ours:.2f}x"
            line += f"{fmt(theirs, how):>12}{ratio:>10}"
        lines.append(line)
    if hf:
        match = ", ".join(f"batch {b}: {100 * r['hf_tokens_match'][b]:.0f}%" for b in batches)
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
    return "\n".join(lines)


def main(
    shape: str = "134M",
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    prompt_len: int = 128,
    gen_len: int = 64,
    batch: int = 8,
    compare_hf: bool = False,
    json: Optional[str] = None,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    compile: bool = False,
    quantize: Optional[str] = None,
    baseline_dtype: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    agreement_prompts: Optional[int] = None,
) -> dict:
    """Benchmark generation on a random model; print a table (rank 0) and optionally write JSON.

    shape: one of tiny, 134M, 7B, 13B, 70B. device: cuda, cpu, mps or None (the best available).
    dtype: float32, float16, bfloat16 or None (the device's default). prompt_len: prompt tokens.
    gen_len: tokens generated per row (>= 2). batch: the larger batch timed besides batch 1.
    compare_hf: also time transformers' LlamaForCausalLM.generate on the same weights.
    json: a path to write the results to (rank 0). warmup, repeats: untimed and timed runs of each
    measurement (the best is reported). seed: weights and prompts.
    compile: generate through Llama(..., compile=True), the torch.compile'd decode step.
    quantize: None, int8 or int4[-gN]: time the model with its weights quantized (see llama/quantize.py).
    baseline_dtype: the dtype the random weights are made in (default: dtype), in which transformers runs
    and against which, when dtype differs or quantize is set, greedy-token agreement and logit error are reported.
    max_seq_len: the context the model and its KV cache are built for (default prompt_len + gen_len).
    agreement_prompts: how many prompts the agreement with the baseline is measured on (default: batch).
    """
    results = run(shape, device, dtype, prompt_len, gen_len, batch, compare_hf, warmup, repeats, seed, compile,
                  quantize, baseline_dtype, max_seq_len, agreement_prompts)
    if global_rank() == 0:
        print(format_table(results), flush=True)
        if json:
            with open(json, "w") as f:
                _json.dump(results, f, indent=2)
                f.write("\n")
    return results


if __name__ == "__main__":
    import fire

    fire.Fire(main, serialize=lambda result: None)  # the table is the output, not the returned dict
