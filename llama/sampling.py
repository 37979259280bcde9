"""Choosing the next token from logits: greedy, or temperature plus nucleus (top-p) sampling."""

import math
from typing import Optional

import torch


def check_sampling_args(temperature: float, top_p: float, max_gen_len: Optional[int]) -> None:
    """Raise ValueError for a temperature below 0, a top_p outside (0, 1] or a max_gen_len below 1."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if max_gen_len is not None and (not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 1):
        raise ValueError(f"max_gen_len must be an integer >= 1 (or None for the longest possible), got {max_gen_len!r}")


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability mass reaches p.

    probs: (bsz, vocab). Returns token ids (bsz, 1).
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # A token is dropped when the tokens before it already reach p; the most likely one always stays.
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The next token (bsz,) from last-position logits (bsz, vocab): argmax at temperature 0, else top-p sampling."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator).reshape(-1)
    return torch.argmax(logits, dim=-1)
