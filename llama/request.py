"""What a generation request is and what it produces: its checked spec, each step's output, its completion."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from llama.checks import is_int
from llama.sampling import SamplingParams, check_max_gen_len


def check_prompt(prompt, vocab_size: int, max_seq_len: int, name: str = "prompt") -> List[int]:
    """The prompt as a list of token ids, or ValueError saying what is wrong with it."""
    if not isinstance(prompt, (list, tuple)) or not all(is_int(t) for t in prompt):
        raise ValueError(f"{name} must be a list of token ids (ints), got {type(prompt).__name__}")
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError(f"{name} is empty; give at least one token (text prompts start with BOS)")
    if len(prompt) > max_seq_len:
        raise ValueError(
            f"{name} has {len(prompt)} tokens, more than max_seq_len={max_seq_len}; "
            f"shorten it or build with a larger max_seq_len"
        )
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    return prompt


def check_stop_token_ids(stop_token_ids, vocab_size: int) -> Tuple[int, ...]:
    """The stop token ids as a tuple of plain ints, or ValueError."""
    ids = () if stop_token_ids is None else stop_token_ids
    if not isinstance(ids, (list, tuple, set, frozenset)) or not all(is_int(t) and 0 <= t < vocab_size for t in ids):
        raise ValueError(f"stop_token_ids must be a list of token ids in [0, {vocab_size}), got {stop_token_ids!r}")
    return tuple(int(t) for t in ids)


@dataclass
class Completion:
    """A finished request. tokens: generated, without the EOS or stop token, cut after the token that
    completes the text before a stop string; text: their text, cut before the stop string."""

    tokens: List[int]
    text: str
    logprobs: List[float]  # of each of tokens (with logprobs=True)
    top_logprobs: List[Dict[int, float]]  # the likeliest alternatives at each of tokens (with top_logprobs)
    prompt_logprobs: List[float]  # of each prompt token, 0.0 for the first (with prompt_logprobs=True)
    prompt_tokens: int
    finish_reason: str  # "eos", "stop", "length", "abort" or "error"

    def stats(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": len(self.tokens), "stop_reason": self.finish_reason}


@dataclass
class StepOutput:
    """What one step did for one request: the token it produced (none while its prompt is read or
    when it ended on EOS or a stop token), the new text that can no longer change, and on the
    step it ends, why and its Completion (error: the exception that failed it)."""

    request_id: int
    new_tokens: List[int]
    text: str
    logprobs: List[float] = field(default_factory=list)  # of new_tokens, with logprobs or top_logprobs
    top_logprobs: List[Dict[int, float]] = field(default_factory=list)  # at each of new_tokens, with top_logprobs
    finish_reason: Optional[str] = None
    completion: Optional[Completion] = None
    error: Optional[BaseException] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestSpec:
    """Everything that defines a request: what rank 0 sends to the other ranks when it admits one."""

    prompt: List[int]
    sampling: SamplingParams
    max_gen_len: int
    stop_token_ids: Tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    ignore_eos: bool = False  # generate past EOS (benchmarks, as vLLM's extension of the OpenAI API)


def make_spec(
    prompt_tokens: Sequence[int],
    sampling: Optional[SamplingParams],
    max_gen_len: Optional[int],
    vocab_size: int,
    max_seq_len: int,
    *,
    stop_token_ids: Optional[Sequence[int]] = None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    prompt_logprobs: bool = False,
    ignore_eos: bool = False,
    name: str = "prompt",
) -> RequestSpec:
    """A checked RequestSpec for a model of vocab_size and context max_seq_len, or ValueError naming what is wrong.
    max_gen_len None: until the context is full."""
    sampling = SamplingParams() if sampling is None else sampling
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    max_gen_len = check_max_gen_len(max_gen_len)
    if not is_int(top_logprobs) or not 0 <= top_logprobs <= 20:
        raise ValueError(f"top_logprobs must be an integer from 0 to 20, got {top_logprobs!r}")
    if not isinstance(ignore_eos, bool):
        raise ValueError(f"ignore_eos must be True or False, got {ignore_eos!r}")
    prompt = check_prompt(prompt_tokens, vocab_size, max_seq_len, name)
    return RequestSpec(prompt, sampling, max_seq_len if max_gen_len is None else max_gen_len,
                       check_stop_token_ids(stop_token_ids, vocab_size), bool(logprobs), int(top_logprobs),
                       bool(prompt_logprobs), ignore_eos)
