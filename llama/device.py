"""Which device and dtype a run uses: the user's choice checked, or the best available."""

import os
from typing import Optional, Union

import torch


def resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """'cuda', 'cpu', 'mps' or None (CUDA if available, else MPS, else CPU); CUDA picks LOCAL_RANK's GPU."""
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device; use 'cuda', 'cpu', 'mps' or None for automatic") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but CUDA is not available; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device='mps' was asked for but MPS is not available; use device='cpu'")
    elif device.type != "cpu":
        raise ValueError(f"device={device.type!r} is not supported; use 'cuda', 'cpu', 'mps' or None")
    return device


def resolve_dtype(dtype: Optional[Union[str, torch.dtype]], device: torch.device) -> torch.dtype:
    """A torch dtype or its name; None: bfloat16 on CUDA where supported (else float16), float16 on MPS, float32 on CPU."""
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16,
                 "fp32": torch.float32, "float": torch.float32}.get(name, getattr(torch, name, None))
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype={dtype!r} is not supported; use 'float32', 'float16' or 'bfloat16'")
    return dtype
