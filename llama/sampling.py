"""Choosing the next token from logits: greedy, or temperature, top-k and nucleus (top-p) sampling,
with an optional repetition penalty."""

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from llama.checks import as_float, check_seed, is_int


def check_max_gen_len(max_gen_len: Optional[int]) -> Optional[int]:
    """max_gen_len as a plain int (or None), or ValueError."""
    if max_gen_len is None:
        return None
    if not is_int(max_gen_len) or max_gen_len < 1:
        raise ValueError(f"max_gen_len must be an integer >= 1 (or None for the longest possible), got {max_gen_len!r}")
    return int(max_gen_len)


@dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen. Checked on construction: bad values raise ValueError.

    temperature: 0 is greedy; otherwise logits are divided by it before the softmax.
    top_p: nucleus sampling keeps the smallest set of likeliest tokens whose mass reaches top_p.
    top_k: None, or keep only the k likeliest tokens before top_p.
    repetition_penalty: CTRL's penalty over tokens already in the sequence (prompt included):
        their positive logits are divided by it, negative ones multiplied. 1.0 is off.
    stop: strings that end generation when they appear in the decoded text, which is cut before them.
    seed: None uses torch's global generator (seeded by Llama.build); an integer from -2**63 to 2**64 - 1
        makes this call reproducible on its own, on any world size.
    frequency_penalty, presence_penalty: OpenAI's additive penalties in [-2, 2] over the tokens
        generated so far: a token's logit loses frequency_penalty per time it was generated, and
        presence_penalty once if it was. 0 is off.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: Optional[int] = None
    repetition_penalty: float = 1.0
    stop: Tuple[str, ...] = ()
    seed: Optional[int] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        # Numbers of any type (numpy's too) are checked and kept as plain Python ones, which pickle and compare alike.
        temperature, top_p, penalty = (as_float(x) for x in (self.temperature, self.top_p, self.repetition_penalty))
        if temperature is None or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if top_p is None or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None (off) or an integer >= 1, got {self.top_k!r}")
        if penalty is None or not 1e-6 <= penalty <= 1e6:
            # Far beyond a factor of a million either way, a penalised logit can overflow to infinity.
            raise ValueError(f"repetition_penalty must be a number from 1e-6 to 1e6 (1.0 is off), "
                             f"got {self.repetition_penalty!r}")
        for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", penalty)):
            object.__setattr__(self, name, value)
        if self.top_k is not None:
            object.__setattr__(self, "top_k", int(self.top_k))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None:
            object.__setattr__(self, "seed", check_seed(self.seed))
        for name in ("frequency_penalty", "presence_penalty"):
            value = as_float(getattr(self, name))
            if value is None or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number from -2 to 2 (0 is off), got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs the counts of generated tokens."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0


def nucleus(probs: torch.Tensor, p) -> Tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of most likely tokens whose probability mass reaches p, renormalised.

    probs: (bsz, vocab); p: a number, or a tensor (bsz, 1) with one per row. Returns the sorted,
    masked probabilities and the token ids they belong to, both (bsz, vocab).
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # A token is dropped when the tokens before it already reach p; the most likely one always stays.
    probs_sort.masked_fill_(probs_sum - probs_sort > p, 0.0)  # not mask indexing, which waits for the GPU
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return probs_sort, probs_idx


def sample_top_p(probs: torch.Tensor, p, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability mass reaches p.

    probs: (bsz, vocab); p: a number, or a tensor (bsz, 1) with one per row. Returns token ids (bsz, 1).
    """
    probs_sort, probs_idx = nucleus(probs, p)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """CTRL's penalty: where seen (bsz, vocab) is True, divide positive logits by penalty and multiply
    negative ones. penalty: a number, or a tensor (bsz, 1) with one per row."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


class TokenHistory:
    """What the penalties need of each KV-cache slot's sequence: which tokens it holds, prompt included (for
    repetition_penalty), and how often its request generated each (for frequency and presence penalties).
    Each table is made the first time a request needs it."""

    def __init__(self, slots: int, vocab_size: int, device: torch.device):
        self.slots, self.vocab_size, self.device = slots, vocab_size, device
        self.seen: Optional[torch.Tensor] = None  # (slots, vocab) bool
        self.counts: Optional[torch.Tensor] = None  # (slots, vocab) int32

    def start(self, slot: int, prompt: Sequence[int], sampling: SamplingParams) -> None:
        """A new request in slot: its prompt is all it has seen, and it has generated nothing."""
        if sampling.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.slots, self.vocab_size, dtype=torch.bool, device=self.device)
            self.seen[slot] = False
            self.seen[slot, torch.tensor(prompt, device=self.device)] = True
        if sampling.counts_tokens:
            if self.counts is None:
                self.counts = torch.zeros(self.slots, self.vocab_size, dtype=torch.int32, device=self.device)
            self.counts[slot] = 0

    def move(self, src: int, dst: int) -> None:
        for table in (self.seen, self.counts):
            if table is not None:
                table[dst] = table[src]

    def rows(self, slots: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(seen, counts) of slots, for next_tokens."""
        return (None if self.seen is None else self.seen[slots]), (None if self.counts is None else self.counts[slots])

    def add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Each of slots generated the token beside it."""
        if self.seen is not None:
            self.seen[slots, tokens] = True
        if self.counts is not None:
            self.counts[slots, tokens] += 1


def _column(values: Sequence, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[Optional[torch.Generator]],
    seen: Optional[torch.Tensor] = None,
    counts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The next token (bsz,) of each row of last-position logits (bsz, vocab), each row with its own settings.

    Row i samples with params[i] and draws from generators[i]; rows whose generator is None draw
    together, in row order, from torch's global generator (as Meta's reference does for a batch).
    seen (bsz, vocab) marks the tokens already in each sequence, for rows with a repetition penalty;
    counts (bsz, vocab) counts the tokens each row generated, for frequency and presence penalties.
    """
    penalties = [p.repetition_penalty for p in params]
    if any(x != 1.0 for x in penalties):
        logits = apply_repetition_penalty(logits, seen, _column(penalties, logits))
    if any(p.counts_tokens for p in params):
        counts = counts.to(logits.dtype)
        logits = logits - _column([p.frequency_penalty for p in params], logits) * counts \
            - _column([p.presence_penalty for p in params], logits) * (counts > 0).to(logits.dtype)
    chosen = torch.argmax(logits, dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return chosen
    rows = [params[i] for i in sampled]
    temperatures = _column([p.temperature for p in rows], logits)
    scaled = logits[sampled] / temperatures
    overflow = ~torch.isfinite(scaled).all(dim=-1, keepdim=True)
    if overflow.any():
        # A temperature so small that logit / temperature overflows: shifting by the row's maximum first gives the
        # same softmax, which is then the limit at 0 (all the mass on the likeliest token).
        shifted = (logits[sampled] - logits[sampled].max(dim=-1, keepdim=True).values) / temperatures
        scaled = torch.where(overflow, shifted, scaled)
    top_k = [p.top_k if p.top_k is not None and p.top_k < logits.shape[-1] else 0 for p in rows]
    if any(top_k):
        kth = torch.topk(scaled, max(top_k), dim=-1).values  # (rows, max k), descending
        cut = kth.gather(1, torch.tensor([max(k, 1) - 1 for k in top_k], device=logits.device)[:, None])
        cut = torch.where(_column(top_k, scaled) > 0, cut, torch.full_like(cut, float("-inf")))
        scaled = scaled.masked_fill(scaled < cut, float("-inf"))
    probs_sort, probs_idx = nucleus(torch.softmax(scaled, dim=-1), _column([p.top_p for p in rows], scaled))
    # One draw per row from the sorted nucleus: rows without a generator in one call, in row order.
    shared = [j for j, i in enumerate(sampled) if generators[i] is None]
    draws = torch.empty(len(sampled), 1, dtype=torch.long, device=logits.device)
    if shared:
        draws[shared] = torch.multinomial(probs_sort[shared], num_samples=1)
    for j, i in enumerate(sampled):
        if generators[i] is not None:
            draws[j] = torch.multinomial(probs_sort[j : j + 1], num_samples=1, generator=generators[i])[0]
    picks = torch.gather(probs_idx, -1, draws).reshape(-1)
    return chosen.index_put((torch.tensor(sampled, device=logits.device),), picks)
