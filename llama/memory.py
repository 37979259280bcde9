"""Memory: the bytes a model's KV cache and rotary table take, what a device has available now, and an error
naming the argument to lower where they would not fit, raised before anything is allocated."""

import os
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from llama.model import ModelArgs


def rope_positions(max_seq_len: int) -> int:
    """The rotary table's length: twice max_seq_len, as in the reference, so positions past it still have angles."""
    return 2 * max_seq_len


def rope_table_bytes(head_dim: int, max_positions: int) -> int:
    """The bytes of llama.model.rope_table(head_dim, max_positions) (float32)."""
    return max_positions * (head_dim // 2) * 2 * 4


def kv_cache_bytes(n_layers: int, slots: int, kv_heads: int, positions: float, head_dim: int, dtype: torch.dtype) -> int:
    """The bytes of the keys and values of n_layers layers, each (slots, kv_heads, positions, head_dim) in dtype."""
    return int(2 * n_layers * slots * kv_heads * positions * head_dim * dtype.itemsize)


def available_memory(device: torch.device) -> Optional[int]:
    """The bytes that can still be allocated on device now; None where that cannot be told."""
    if device.type == "cuda":
        # What the driver has free, and what torch's caching allocator holds but no tensor uses.
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        try:
            return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        except (AttributeError, RuntimeError):
            return None
    if device.type != "cpu":  # the meta device holds nothing
        return None
    try:  # MemAvailable counts the page cache the kernel can reclaim (memory-mapped weights among it)
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such sysconf name (macOS)
        return None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def check_memory(args: "ModelArgs", device: torch.device, dtype: torch.dtype, kv_heads: Optional[int] = None,
                 cache: bool = True, freed: int = 0) -> None:
    """ValueError, saying what is needed, what device has and which argument to lower, where args'
    max_seq_len and max_batch_size ask for more memory than device has available now.

    cache=False: the rotary table alone (it is built on the CPU). cache=True: the KV cache of kv_heads
    (default: all of args' kv heads) per layer in dtype, plus the rotary table where it moves to a
    device other than the CPU; freed is the bytes of an old cache that the new one replaces. Checked
    before allocating, so that a mistyped size fails at once instead of taking the machine's memory.
    """
    available = available_memory(device)
    if available is None:
        return
    available += freed
    head_dim, seq, batch = args.head_dim, args.max_seq_len, args.max_batch_size
    with_rope = not cache or device.type != "cpu"
    rope = rope_table_bytes(head_dim, rope_positions(seq)) if with_rope else 0
    kv = kv_cache_bytes(args.n_layers, batch, kv_heads or args.kv_heads, seq, head_dim, dtype) if cache else 0
    if rope + kv <= available:
        return
    # What would fit: the memory grows linearly with max_seq_len, and the cache with max_batch_size.
    per_position = kv // seq + (rope_table_bytes(head_dim, rope_positions(1)) if with_rope else 0)
    fixes = [f"max_seq_len (at most {available // per_position} fits" + (f" with max_batch_size={batch})" if kv else ")")]
    if kv and available > rope:
        fixes.insert(0, f"max_batch_size (at most {(available - rope) // (kv // batch)} fits with max_seq_len={seq})")
    needs = " and ".join(([f"a KV cache of {_size(kv)}"] if kv else []) + ([f"a rotary table of {_size(rope)}"] if rope else []))
    raise ValueError(
        f"max_seq_len={seq}" + (f" and max_batch_size={batch} need" if kv else " needs") + f" {needs} on {device.type}, "
        f"but it has {_size(available)} available; lower {' or '.join(fixes)}"
    )
