"""Measuring helpers for the benchmarks: timing with the device synchronised, peak memory, the device's
copy bandwidth, generation speeds from timed runs, percentiles, CPU time (of other processes, of this one's
threads), and the device's name.

Under torchrun the timed calls start together on every rank (a barrier before each) and reduce()
combines a figure over the ranks; in a single process both do nothing.
"""

import ctypes
import json as _json
import gc
import math
import os
import platform
import resource
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from llama.model import Transformer


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA, MPS); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Wall-clock seconds of each of repeats calls of fn (after warmup untimed ones), the device synchronised
    around each, and under torchrun all ranks starting together."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        barrier()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def decode_speed(t_one: List[float], t_all: List[float], batch: int, prompt_len: int, gen_len: int,
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


def time_generators(generators: Dict[str, Callable[[List[List[int]], int], List[List[int]]]], prompts: List[List[int]],
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

                t = time_calls(run, device, warmup=0, repeats=1)[0]
                if i >= warmup:
                    times[name][which].append(t)
    for name, rows in tokens.items():
        lengths = {len(t) for t in rows}
        if lengths != {gen_len}:
            raise RuntimeError(f"{name}: generation gave {sorted(lengths)} new tokens per row, not {gen_len}: the timing would be wrong")
    return {name: (t_one, t_all, tokens[name]) for name, (t_one, t_all) in times.items()}


def reduce(values: List[float], device: torch.device, op) -> List[float]:
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
    best = min(time_calls(lambda: dst.copy_(src), device, warmup=1, repeats=repeats))
    del src, dst
    return 2 * nbytes / best


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of values, interpolating linearly between the two nearest ranks
    (numpy's default): rank q/100 * (n - 1) of the sorted values. ValueError when values is empty."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be between 0 and 100, got {q!r}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class OtherLoad:
    """CPU seconds that other processes used from the start until seconds() (Linux: /proc/stat's busy time
    of every CPU less this process's own), or None where /proc/stat cannot be read. On a CPU benchmark,
    other work sharing the cores slows every figure; this says how much there was."""

    def __init__(self):
        self.start = self._busy()

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
        own = os.times()
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system

    def seconds(self) -> Optional[float]:
        end = self._busy()
        if self.start is None or end is None:
            return None
        return max(0.0, (end[0] - self.start[0]) - (end[1] - self.start[1]))


def thread_cpu_s() -> Dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by native id: Linux's /proc; {} elsewhere."""
    ticks, out = os.sysconf("SC_CLK_TCK"), {}
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        return {}
    return out


def cpu_split(before: Dict[int, float], after: Dict[int, float], named: Dict[str, int]) -> Optional[dict]:
    """CPU seconds between two thread_cpu_s() readings: of the named threads, and of all the others."""
    if not after:
        return None
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    split = {name: used.pop(tid, 0.0) for name, tid in named.items()}
    return {**split, "other_threads": sum(used.values())}


# --- what a run reads and how close its tokens are ----------------------------------------------


def weight_bytes(model: "Transformer") -> int:
    """The bytes of the weights as stored: quantized weights and their scales included, the KV cache not."""
    return sum(t.nbytes for t in model.state_dict().values())


def tokens_equal_share(tokens: List[List[int]], reference: List[List[int]]) -> float:
    """The share of all generated tokens equal to the reference's at the same place."""
    return sum(x == y for t, r in zip(tokens, reference) for x, y in zip(t, r)) / sum(len(r) for r in reference)


def agreement(tokens: List[List[int]], reference: List[List[int]], n: int) -> Dict[str, float]:
    """Greedy agreement of rows of tokens with the reference's: the share of rows equal on their first
    n tokens, the share of all tokens equal, and how many tokens come before a row's first difference."""
    first_difference = [next((i for i, (x, y) in enumerate(zip(t, r)) if x != y), len(r)) for t, r in zip(tokens, reference)]
    return {
        "prompts": len(reference),
        "first_n": n,
        "rows_first_n_equal": sum(d >= n for d in first_difference) / len(reference),
        "tokens_equal": tokens_equal_share(tokens, reference),
        "mean_tokens_before_first_difference": sum(first_difference) / len(reference),
    }


def quantization_error(reference_logits: torch.Tensor, logits: torch.Tensor) -> Dict[str, float]:
    """Max and mean absolute logit difference, and how often the top-1 token agrees, over every position."""
    diff = (logits - reference_logits).abs()
    top1 = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean()
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(), "top1_agreement": top1.item(),
            "reference_logit_std": reference_logits.std().item()}


def decode_bytes_per_step(model: "Transformer", batch: int, prompt_len: int, gen_len: int) -> Dict[str, int]:
    """The bytes one decode step of this rank must read: its weights and the KV cache so far.

    Every weight is read once per step, except the embedding table, of which only the batch's rows
    are. The decode steps of a run start at positions prompt_len .. prompt_len + gen_len - 2 and each
    reads the keys and values of every position up to its own, prompt_len + gen_len / 2 on average.
    Activations and the new cache entries written are left out (they are tiny beside these).
    """
    emb = model.tok_embeddings.weight
    weights = weight_bytes(model) - emb.nbytes + batch * emb.shape[1] * emb.element_size()
    attn = model.layers[0].attention
    avg_positions = prompt_len + gen_len / 2
    kv = 2 * model.n_layers * batch * attn.n_local_kv_heads * attn.head_dim * avg_positions * emb.element_size()
    return {"weights": int(weights), "kv": int(kv), "total": int(weights + kv)}


# --- the machine -----------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
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


def check_output_path(path, flag: str = "--json") -> Optional[str]:
    """path as a str when a file can be written there (its folder exists and is writable, and path is not a
    folder), None when no path is given (None or empty); else ValueError naming flag. Called before a long run,
    which would otherwise fail only when it writes its results at the end."""
    if path is None or path == "":
        return None
    path = str(path)  # fire turns --json 123 into an int
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory; give a file name in it, e.g. {os.path.join(path, 'results.json')}")
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: the directory {folder} does not exist; create it (mkdir -p {folder}) or "
                         f"choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path}: cannot be written (permission denied); choose another path")
    return path


def write_json(path: Optional[str], results: dict) -> None:
    """Write results as JSON to path (nothing when path is None)."""
    if path:
        with open(path, "w") as f:
            _json.dump(results, f, indent=2)
            f.write("\n")


def report(table: str, results: dict, json_path: Optional[str]) -> None:
    """Print a benchmark's table and write its results as JSON to json_path (when given)."""
    print(table, flush=True)
    write_json(json_path, results)
