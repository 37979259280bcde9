"""Process-group setup for one process per device (torchrun) or a plain process, and this process's ranks."""

import atexit
import contextlib
import gc
import os
import sys
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from llama.checks import check_positive_int

# Re-exported for llama/bench.py until it imports them from llama.device.


def model_parallel_world_size() -> int:
    """Ranks the model is split over: fairscale's model-parallel group size, or 1 when it is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        return 1
    from fairscale.nn.model_parallel import initialize as mpu

    return mpu.get_model_parallel_world_size() if mpu.model_parallel_is_initialized() else 1


def model_parallel_rank() -> int:
    if model_parallel_world_size() == 1:
        return 0
    from fairscale.nn.model_parallel import initialize as mpu

    return mpu.get_model_parallel_rank()


def is_printing_rank() -> bool:
    """Whether this process reports results: rank 0 of the process group, or any process without one. Before the
    group is set up, torchrun's RANK decides; a RANK left in the shell of a plain process (no WORLD_SIZE) does not."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return "WORLD_SIZE" not in os.environ or os.environ.get("RANK", "0") == "0"


def global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _destroy_process_group() -> None:
    if not dist.is_initialized():
        return
    # A Gloo rank tearing down while a peer closes its connections can abort, so ranks that end
    # normally first meet. monitored_barrier gives up after a while instead of waiting for a
    # rank that died; after an uncaught exception (sys.last_value) no rank is waited for.
    if dist.get_backend() == "gloo" and not hasattr(sys, "last_value"):
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        except RuntimeError:
            pass
    # fairscale's module globals hold its groups; a group still referenced at interpreter shutdown is
    # torn down then, with its Gloo threads, which can abort. Dropped here, all go with destroy_process_group.
    from fairscale.nn.model_parallel import initialize as mpu

    mpu.destroy_model_parallel()
    dist.destroy_process_group()
    gc.collect()


def setup_model_parallel(device: torch.device, model_parallel_size: Optional[int]) -> int:
    """Join torchrun's process group (NCCL on CUDA, Gloo otherwise) and set up fairscale's model-parallel groups.

    A plain process with no torchrun variables and model_parallel_size 1 or None needs no process
    group at all. Returns the model-parallel size.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if model_parallel_size is None:
        model_parallel_size = world_size
    model_parallel_size = check_positive_int("model_parallel_size", model_parallel_size)
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            if model_parallel_size != 1:
                raise ValueError(
                    f"model_parallel_size={model_parallel_size} needs one process per rank: launch with "
                    f"torchrun --nproc_per_node {model_parallel_size} <script>"
                )
            return 1
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # A process group left alive at interpreter exit can abort the process (Gloo's threads), so
        # the group this call made is torn down when the program ends.
        atexit.register(_destroy_process_group)
    world_size = dist.get_world_size()
    if world_size % model_parallel_size:
        raise ValueError(f"model_parallel_size={model_parallel_size} does not divide the world size {world_size}")
    if model_parallel_size > 1 and device.type == "mps":
        raise ValueError("model parallelism is not available on MPS (Gloo cannot reduce MPS tensors); run one process")
    from fairscale.nn.model_parallel import initialize as mpu

    if not mpu.model_parallel_is_initialized():
        # fairscale prints "> initializing model parallel ..." lines: set-up notes for stderr, not a program's output.
        with contextlib.redirect_stdout(sys.stderr):
            mpu.initialize_model_parallel(model_parallel_size)
    elif mpu.get_model_parallel_world_size() != model_parallel_size:
        raise ValueError(
            f"model parallelism is already set up with size {mpu.get_model_parallel_world_size()}, "
            f"not the requested {model_parallel_size}"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return model_parallel_size
